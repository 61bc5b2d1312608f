"""Theorem 1, exactly: with the true density ratio as discriminator and w = 1, the guided denoiser of a wrong
model is the data's posterior mean. The model's denoiser is installed on a real ComfyUI model and evaluated
through ComfyUI's own sampling path (CFGGuider → sampling_function → post-CFG hooks), in float64."""
import pytest
import torch

from analytic import DATA, MODEL, SIGMAS, ExactRatio, alpha_of, analytic_model, evaluate
from comfy_dg import guide
from comfy_dg.dg import LOGIT_MAX


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("model_type", ["EPS", "V_PREDICTION", "EDM", "FLOW"])
def test_guided_denoiser_is_data_posterior_mean(model_type, cfg):
    m = analytic_model(model_type)
    points = []
    for i, sigma in enumerate(SIGMAS[model_type]):
        s = torch.full((6,), sigma, dtype=torch.float64)
        points.append((sigma, MODEL.sample_noisy(6, s, alpha_of(model_type, s), seed=10 + i)))
    ms = m.model.model_sampling
    guided = evaluate(guide(m, ExactRatio(ms, model_type), weight=1.0), points, cfg)
    plain = evaluate(m, points, cfg)
    checked = 0
    for (sigma, x, d_guided), (_, _, d_plain) in zip(guided, plain):
        s = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        a = alpha_of(model_type, s)
        target = DATA.posterior_mean(x, s, a)
        # d is clipped to [1e-5, 1 − 1e-5]: where the true ratio is beyond that, no correction is applied.
        inside = (DATA.log_density(x, s, a) - MODEL.log_density(x, s, a)).abs() < LOGIT_MAX
        rel = (d_guided - target).norm(dim=1) / target.norm(dim=1)
        rel_plain = (d_plain - target).norm(dim=1) / target.norm(dim=1)
        if inside.any():
            # float64 rounding: at most 3.7e-13 measured (EDM at σ = 40), so the bound is 1e-12.
            assert rel[inside].max() <= 1e-12, f"{model_type} σ={sigma}: relative error {rel[inside].max():.2e}"
            # The model really is wrong there, so the test could fail.
            assert rel_plain[inside].min() > 1e-4, f"{model_type} σ={sigma}: the model is already right"
        assert torch.equal(d_guided[~inside], d_plain[~inside])
        assert d_guided.dtype == torch.float64
        checked += int(inside.sum())
    assert checked >= 0.8 * sum(p[1].shape[0] for p in points)


def test_weight_scales_the_correction_linearly():
    m = analytic_model("EPS")
    s = torch.full((4,), 1.0, dtype=torch.float64)
    points = [(1.0, MODEL.sample_noisy(4, s, s * 0 + 1, seed=3))]
    ms = m.model.model_sampling
    plain = evaluate(m, points, 1.0)[0][2]
    d1 = evaluate(guide(m, ExactRatio(ms, "EPS"), weight=1.0), points, 1.0)[0][2]
    d3 = evaluate(guide(m, ExactRatio(ms, "EPS"), weight=3.0), points, 1.0)[0][2]
    torch.testing.assert_close(d3 - plain, 3 * (d1 - plain), rtol=1e-9, atol=1e-12)
