"""The one place that knows how ComfyUI parameterizes a model's sampler state.

ComfyUI samplers work in k-diffusion's convention: the state is x = α(σ)·x0 + σ·ε, and the model's
`model_sampling` object says what α is through `noise_scaling(σ, ε, x0)` (read at call time, so ModelSamplingSD3 /
ModelSamplingFlux patches are honoured). Since the score is (α·D − x)/σ², a score correction Δs moves the
denoised output by ΔD = σ²/α · Δs (dg.correction).
"""
from typing import NamedTuple

import torch

from .errors import UnsupportedModel

# Flow models have α = 1 − σ, which reaches 0 at σ = 1; σ²/α is capped by flooring α here.
# 0.05 keeps σ²/α ≤ 20 and leaves every σ ≤ 0.95 untouched (the Theorem-1 tests use σ ≤ 0.9).
ALPHA_MIN = 0.05
_PROBE_SIGMAS = (0.03, 0.3, 0.7, 3.0, 30.0)


def alpha(model_sampling, sigma: torch.Tensor, floor: float = ALPHA_MIN) -> torch.Tensor:
    """α(σ) per sample, floored at `floor`: 1 for EPS, V_PREDICTION, EDM and X0 models, 1 − σ for flow."""
    sigma = sigma.reshape(-1)
    ones = torch.ones_like(sigma).reshape(-1, 1)
    return model_sampling.noise_scaling(sigma, torch.zeros_like(ones), ones).reshape(-1).clamp_min(floor)


def check_supported(model_sampling):
    """Refuse sampling types that do not add noise as σ·ε (then a score correction has no σ²/α form)."""
    sigma = torch.tensor(_PROBE_SIGMAS, dtype=torch.float64).reshape(-1, 1)
    noise = model_sampling.noise_scaling(sigma.reshape(-1), torch.ones_like(sigma), torch.zeros_like(sigma))
    if not torch.allclose(noise.reshape(-1).double(), sigma.reshape(-1), rtol=1e-4, atol=1e-6):
        raise UnsupportedModel(
            f"comfy-dg: the model's sampling ({type(model_sampling).__name__}) does not add noise as σ·ε, so "
            "discriminator guidance cannot map a score correction onto it. Supported: EPS, V_PREDICTION, EDM, X0 "
            "and flow (CONST) models (SD1.x, SD2, SDXL, SD3, Flux and the like).")


class Window(NamedTuple):
    """Guidance is active where end ≤ σ ≤ start; w(σ) is scheduled from hi (u = 0) to lo (u = 1), the window's
    ends taken within the model's own σ range."""
    start: float
    end: float
    hi: float
    lo: float

    def contains(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma <= self.start) & (sigma >= self.end)


def window(model_sampling, start_percent: float, end_percent: float) -> Window:
    start = float(model_sampling.percent_to_sigma(start_percent))
    end = float(model_sampling.percent_to_sigma(end_percent))
    return Window(start, end, min(start, float(model_sampling.sigma_max)), max(end, float(model_sampling.sigma_min)))
