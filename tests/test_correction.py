"""The correction's exact size and sign, through ComfyUI's sampling path on the analytic model (float64).

A linear discriminator log r = ⟨c, x_in⟩ + b has ∇ₓ log r = c_in(σ)·c (x_in = c_in·x), so the guided denoiser
moves by exactly ΔD = w(σ)·σ²/α(σ)·c_in(σ)·c. α and c_in are written out per model type here, independently of
the pack: α = 1 − σ for flow models and 1 otherwise; c_in = 1/√(σ² + 1) for EPS, V and EDM (σ_data = 1), 1 for
flow."""
import math

import pytest
import torch

from analytic import DIM, MODEL, alpha_of, analytic_model, evaluate
from comfy_dg import DiscriminatorInfo, guide

SIGMAS = {"EPS": [8.0, 2.0, 0.5, 0.1], "V_PREDICTION": [8.0, 1.0, 0.1], "EDM": [40.0, 3.0, 0.3, 0.01],
          "FLOW": [0.9, 0.6, 0.3, 0.05]}
C = 0.02 * torch.randn(DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def c_in(model_type, sigma):
    return torch.ones_like(sigma) if model_type == "FLOW" else 1.0 / (sigma ** 2 + 1.0).sqrt()


class Linear(torch.nn.Module):
    """log r = ⟨c_k, x_in⟩ + b_i: c_k per class (row k; the last row is "no class"), b per sample (its sign)."""

    def __init__(self, c, offsets=None, num_classes=0):
        super().__init__()
        self.c, self.offsets = c, offsets
        self.info = DiscriminatorInfo(4, "SD15", num_classes=num_classes)

    def forward(self, x_in, sigma, labels=None):
        c = self.c[-1] if labels is None else self.c[labels]
        logit = (x_in.flatten(1) * c.to(x_in)).sum(1)
        return logit if self.offsets is None else logit + self.offsets.to(logit)

    def bind(self, base_model, labels=None):
        return lambda x_in, sigma: self(x_in, sigma, labels)


def points(model_type, n=4, seed=0):
    out = []
    for i, sigma in enumerate(SIGMAS[model_type]):
        s = torch.full((n,), sigma, dtype=torch.float64)
        out.append((sigma, MODEL.sample_noisy(n, s, alpha_of(model_type, s), seed=seed + i)))
    return out


def shifts(model, disc, pts, **options):
    """ΔD = guided − unguided denoised at each point."""
    plain = evaluate(model, pts, 1.0)
    guided = evaluate(guide(model, disc, **options), pts, 1.0)
    return [(sigma, g - p) for (sigma, _, p), (_, _, g) in zip(plain, guided)]


def expected(model_type, sigma, w, c):
    s = torch.tensor(sigma, dtype=torch.float64)
    return w * s ** 2 / alpha_of(model_type, s) * c_in(model_type, s) * c


@pytest.mark.parametrize("model_type", ["EPS", "V_PREDICTION", "EDM", "FLOW"])
@pytest.mark.parametrize("w", [0.5, 2.0, 20.0])
def test_the_correction_is_w_sigma2_over_alpha_grad_log_r(model_type, w):
    m = analytic_model(model_type)
    for sigma, delta in shifts(m, Linear(C[None]), points(model_type), weight=w):
        want = expected(model_type, sigma, w, C).expand_as(delta)
        torch.testing.assert_close(delta, want, rtol=1e-10, atol=1e-14)
        assert delta.abs().max() > 1e-6 * w


@pytest.mark.parametrize("schedule,factor", [
    ("constant", lambda u: 1.0), ("linear_up", lambda u: u), ("linear_down", lambda u: 1.0 - u),
    ("cosine", lambda u: 0.5 * (1.0 + math.cos(math.pi * u)))])
def test_each_schedule_scales_the_correction_by_its_position_in_log_sigma(schedule, factor):
    m = analytic_model("EPS")
    ms = m.model.model_sampling
    hi, lo = float(ms.percent_to_sigma(0.1)), float(ms.percent_to_sigma(0.9))
    sigmas = [hi, (hi ** 3 * lo) ** 0.25, (hi * lo) ** 0.5, lo * 1.0001]
    pts = [(s, MODEL.sample_noisy(2, torch.full((2,), s, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                                  seed=i)) for i, s in enumerate(sigmas)]
    for sigma, delta in shifts(m, Linear(C[None]), pts, weight=3.0, start_percent=0.1, end_percent=0.9,
                               schedule=schedule):
        u = (math.log(hi) - math.log(sigma)) / (math.log(hi) - math.log(lo))
        want = expected("EPS", sigma, 3.0 * factor(u), C).expand_as(delta)
        torch.testing.assert_close(delta, want, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("boost", [0.0, 1.0, 2.5, 10.0])
def test_boost_multiplies_exactly_the_samples_judged_fake(boost):
    m = analytic_model("EDM")
    offsets = torch.tensor([3.0, -3.0, 2.0, -2.0], dtype=torch.float64)     # log r > 0, < 0, > 0, < 0
    for sigma, delta in shifts(m, Linear(C[None], offsets), points("EDM"), weight=2.0, boost=boost):
        want = expected("EDM", sigma, 2.0, C).expand_as(delta).clone()
        want[offsets < 0] *= boost
        torch.testing.assert_close(delta, want, rtol=1e-10, atol=1e-14)


def test_class_conditional_guidance_moves_toward_the_chosen_class():
    """log r_k = ⟨c_k, x_in⟩: guiding toward class k moves D along c_k (and with no class, along the unconditional
    row), with the exact size."""
    rows = 0.02 * torch.randn(4, DIM, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    m = analytic_model("EPS")
    disc = Linear(rows, num_classes=3)
    for label, row in [(0, rows[0]), (2, rows[2]), (-1, rows[3])]:
        for sigma, delta in shifts(m, disc, points("EPS"), weight=1.5, class_label=label):
            torch.testing.assert_close(delta, expected("EPS", sigma, 1.5, row).expand_as(delta), rtol=1e-10,
                                       atol=1e-14)
            # The direction: along the class's own row, and not along another class's.
            cos = torch.nn.functional.cosine_similarity(delta, row.expand_as(delta), dim=1)
            assert torch.all(cos > 1 - 1e-9)
