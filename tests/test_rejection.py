"""The DG rejection sampler (DiffRS's scheme with our discriminators) through ComfyUI's own sampling."""
import pytest
import torch

import comfy.sample
import comfy.samplers
from comfy_dg.rejection import Counter, dg_rejection_sampler, renoise
from harness.tiny import empty_conditioning, tiny_model

STEPS = 6


class Constant(torch.nn.Module):
    """log r = c everywhere: every ratio is 1, so every step is accepted."""

    def forward(self, x_in, sigma):
        return torch.full((x_in.shape[0],), 0.7, dtype=x_in.dtype, device=x_in.device)


class HatesPositiveMean(torch.nn.Module):
    """log r = −4·tanh(mean of x_in): samples drifting to a positive mean look fake."""

    def forward(self, x_in, sigma):
        return -4.0 * torch.tanh(x_in.flatten(1).mean(1) * 5)


def run(model, sampler, seed=3, batch=6, cfg=3.0):
    pos, neg = empty_conditioning(model)
    sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "karras", STEPS)
    latent = torch.zeros(batch, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, pos, neg, latent, seed=seed,
                                          disable_pbar=True)


@pytest.mark.parametrize("base", ["heun", "euler"])
@pytest.mark.parametrize("model_type", ["EPS", "FLOW"])
def test_accepting_everything_is_exactly_the_plain_sampler(base, model_type):
    m = tiny_model(model_type, seed=0)
    plain = run(m, comfy.samplers.ksampler(base))
    counter = Counter()
    same = run(m, dg_rejection_sampler(Constant(), base=base, counter=counter))
    assert torch.equal(same, plain)
    assert counter.rejections == 0
    assert counter.model == 6 * (STEPS if base == "euler" else 2 * STEPS - 1)
    # No retries allowed: whatever the discriminator says, the plain sampler again.
    assert torch.equal(run(m, dg_rejection_sampler(HatesPositiveMean(), base=base, max_retries=0)), plain)


def test_rejections_cost_bounded_extra_steps_and_change_the_samples():
    m = tiny_model("EPS", seed=0)
    plain = run(m, comfy.samplers.ksampler("euler"), batch=8)
    counter = Counter()
    out = run(m, dg_rejection_sampler(HatesPositiveMean(), base="euler", quantile=0.5, max_retries=3,
                                      counter=counter), batch=8)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert counter.rejections > 0
    assert counter.model == 8 * STEPS + counter.rejections          # one more model call per rejection
    assert counter.rejections <= 8 * (STEPS - 1) * 3                  # never more than max_retries per step
    # Same seed, same result: the rejection draws are seeded.
    assert torch.equal(run(m, dg_rejection_sampler(HatesPositiveMean(), base="euler", quantile=0.5,
                                                   max_retries=3), batch=8), out)


def test_renoise_follows_the_models_forward_process():
    m = tiny_model("FLOW", seed=0)
    ms = m.model.model_sampling
    x0 = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    e1, e2 = torch.randn_like(x0), torch.randn_like(x0)
    s_from, s_to = torch.full((4,), 0.3, dtype=torch.float64), torch.full((4,), 0.6, dtype=torch.float64)
    x_from = (1 - 0.3) * x0 + 0.3 * e1
    x_to = renoise(ms, x_from, s_from, s_to, e2)
    # Flow: x_σ = (1 − σ)·x0 + σ·ε; the re-noised state has mean (1 − 0.6)·x0 and noise variance 0.6².
    noise = x_to - 0.4 * x0
    expected = (0.4 / 0.7) * 0.3 * e1 + (0.6 ** 2 - (0.4 / 0.7 * 0.3) ** 2) ** 0.5 * e2
    torch.testing.assert_close(noise, expected)
    # Near σ = 1, where α = 1 − σ is below guiding's floor (parameterization.ALPHA_MIN): still the exact process.
    s_top = torch.full((4,), 0.97, dtype=torch.float64)
    x_top = renoise(ms, x_from, s_from, s_top, e2)
    expected = (0.03 / 0.7) * 0.3 * e1 + (0.97 ** 2 - (0.03 / 0.7 * 0.3) ** 2) ** 0.5 * e2
    torch.testing.assert_close(x_top - 0.03 * x0, expected)


def test_bad_settings_and_inpainting_are_refused():
    with pytest.raises(ValueError, match="quantile"):
        dg_rejection_sampler(Constant(), quantile=1.5)
    with pytest.raises(ValueError, match="base"):
        dg_rejection_sampler(Constant(), base="dpmpp_2m")
    m = tiny_model("EPS", seed=0)
    pos, neg = empty_conditioning(m)
    sigmas = comfy.samplers.calculate_sigmas(m.model.model_sampling, "karras", STEPS)
    latent = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="inpainting"), torch.inference_mode():
        comfy.sample.sample_custom(m, torch.randn_like(latent), 1.0, dg_rejection_sampler(Constant()), sigmas, pos, neg,
                                   latent, noise_mask=torch.ones(2, 1, 64, 64), seed=0, disable_pbar=True)


def test_class_label_is_checked_against_the_discriminator():
    """The sampler refuses a class_label the discriminator does not know, as guiding and ranking do."""
    m = tiny_model("EPS", seed=0)
    with pytest.raises(ValueError, match="not class-conditional"):
        run(m, dg_rejection_sampler(Constant(), class_label=2))


@pytest.mark.parametrize("w2", [0.0, 0.5])
def test_a_guided_model_gets_w_and_w2_on_the_right_evaluations(w2, caplog):
    """On a model patched by Discriminator Guidance, the sampler tells the patch which evaluation of a step each
    model call is: accepting everything, it is exactly heun on the same guided model (whose evaluations the
    patch follows from ComfyUI's callbacks), with w on each step's first evaluation and w₂ on Heun's correction,
    and nothing in the log about steps it could not tell."""
    from builders import standalone
    from comfy_dg import guide
    m = guide(tiny_model("EPS", seed=0), standalone(), weight=2.0, intermediate_weight=w2)
    with caplog.at_level("WARNING"):
        same = run(m, dg_rejection_sampler(Constant(), base="heun"))
    assert torch.equal(same, run(m, comfy.samplers.ksampler("heun")))
    assert not torch.equal(same, run(guide(tiny_model("EPS", seed=0), standalone(), weight=2.0,
                                           intermediate_weight=2.0), comfy.samplers.ksampler("heun")))
    assert "cannot tell" not in caplog.text


def test_a_batch_of_one_is_plain_sampling_and_the_log_says_so(caplog):
    """M comes from the batch's own first proposals, so one sample always meets it: the sampler says so."""
    m = tiny_model("EPS", seed=0)
    with caplog.at_level("WARNING"):
        one = run(m, dg_rejection_sampler(HatesPositiveMean(), base="euler", quantile=0.5), batch=1)
    assert torch.equal(one, run(m, comfy.samplers.ksampler("euler"), batch=1))
    assert "batch of 1" in caplog.text


class Negated(torch.nn.Module):
    def __init__(self, ratio):
        super().__init__()
        self.ratio = ratio

    def forward(self, x_in, sigma):
        return -self.ratio(x_in, sigma)


def test_with_the_exact_ratio_the_samples_move_toward_the_data():
    """Theorem 1's setting (analytic.py: the model is a wrong Gaussian mixture with its exact denoiser, the
    discriminator the exact log p_data,σ/p_model,σ). DiffRS's rule with the true ratio moves the samples' mixture
    proportions from the model's toward the data's and raises their likelihood under the data; the same ratio
    negated moves them away (the direction is the rule's, not chance's)."""
    from comfy.k_diffusion.sampling import sample_heun
    from analytic import DATA, SHAPE, ExactRatio, analytic_model
    from official import exact_sampler, karras
    from comfy_dg.rejection import sample_dg_rejection

    def sample(fn, judge=None, **options):
        m = analytic_model("EDM")
        if judge is not None:
            options["discriminator"] = judge(ExactRatio(m.model.model_sampling, "EDM"))
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(*empty_conditioning(m))
        guider.set_cfg(1.0)
        sampler, result = exact_sampler(fn, torch.float64, **options)
        z = torch.randn(512, *SHAPE, generator=torch.Generator().manual_seed(0)).double()
        with torch.inference_mode():
            guider.sample(z, torch.zeros_like(z), sampler, karras(), disable_pbar=True, seed=0)
        x = result[0].flatten(1)
        s = torch.full((len(x),), 1e-3, dtype=torch.float64)
        logp, _, _ = DATA._components(x, s, torch.ones_like(s))
        proportions = torch.softmax(logp, 1).mean(0)
        return float((proportions - DATA.weights).abs().sum() / 2), float(torch.logsumexp(logp, 1).mean())

    plain_tv, plain_ll = sample(sample_heun)
    tv, ll = sample(sample_dg_rejection, judge=lambda r: r, quantile=0.9, max_retries=4)
    away_tv, away_ll = sample(sample_dg_rejection, judge=Negated, quantile=0.9, max_retries=4)
    assert plain_tv > 0.2, "the model's proportions are already the data's: the test could not fail"
    assert tv < 0.7 * plain_tv and ll > plain_ll + 2.0, (plain_tv, tv, plain_ll, ll)
    assert away_tv > plain_tv and away_ll < plain_ll, (plain_tv, away_tv, plain_ll, away_ll)
