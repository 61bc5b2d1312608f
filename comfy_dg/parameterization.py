"""The one place that knows how ComfyUI parameterizes a model's sampler state.

ComfyUI samplers work in k-diffusion's convention: the state is x = α(σ)·x0 + σ·ε, and the model's
`model_sampling` object says what α is through `noise_scaling(σ, ε, x0)`. Since the score is
(α·D − x)/σ², a score correction Δs moves the denoised output by ΔD = σ²/α · Δs.
"""
import torch

# Flow models have α = 1 − σ, which reaches 0 at σ = 1; σ²/α is capped by flooring α here.
# 0.05 keeps σ²/α ≤ 20 and leaves every σ ≤ 0.95 untouched (the Theorem-1 tests use σ ≤ 0.9).
ALPHA_MIN = 0.05


class UnsupportedSampling(ValueError):
    pass


def _coefficients(model_sampling, sigma: torch.Tensor):
    """(α, noise coefficient) per sample, read off the model's own noise_scaling."""
    ones = torch.ones_like(sigma).reshape(-1, 1)
    zeros = torch.zeros_like(ones)
    alpha = model_sampling.noise_scaling(sigma, zeros, ones.clone()).reshape(-1)
    noise_coef = model_sampling.noise_scaling(sigma, ones.clone(), zeros.clone()).reshape(-1)
    return alpha, noise_coef


def alpha(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """α(σ) in x = α·x0 + σ·ε: 1 for EPS, V_PREDICTION, EDM and X0 models, 1 − σ for flow (CONST)."""
    a, noise_coef = _coefficients(model_sampling, sigma)
    if not torch.allclose(noise_coef, sigma.reshape(-1).to(noise_coef.dtype), rtol=1e-4, atol=1e-6):
        raise UnsupportedSampling(
            f"comfy-dg: the model's sampling ({type(model_sampling).__name__}) does not add noise as σ·ε, "
            "so discriminator guidance cannot map a score correction onto it. Supported: EPS, V_PREDICTION, "
            "EDM, X0 and flow (CONST) models (SD1.x, SD2, SDXL, SD3, Flux and the like).")
    return a


def denoised_scale(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """σ²/α per sample: how a score correction moves the denoised output. α is floored at ALPHA_MIN."""
    sigma = sigma.reshape(-1)
    return sigma ** 2 / alpha(model_sampling, sigma).clamp_min(ALPHA_MIN)


def sigma_window(model_sampling, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(σ_start, σ_end) of a start/end percent window; guidance is active where σ_end ≤ σ ≤ σ_start."""
    return (float(model_sampling.percent_to_sigma(start_percent)),
            float(model_sampling.percent_to_sigma(end_percent)))


def sigma_range(model_sampling) -> tuple[float, float]:
    return float(model_sampling.sigma_min), float(model_sampling.sigma_max)
