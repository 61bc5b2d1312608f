"""Noising latents the way the model itself does: σ from the model's own schedule, x = noise_scaling(σ, ε, x0)."""
import math

import torch

from ..errors import TrainingError
from ..parameterization import alpha

# The paper's VP SDE: β(t) = β0 + (β1 − β0)·t on t ∈ [1e-5, 1].
VP_BETA_0, VP_BETA_1, VP_T_MIN, VP_T_MAX = 0.1, 20.0, 1e-5, 1.0


def timestep_range(model_sampling, sigma_min=None, sigma_max=None):
    lo = float(model_sampling.sigma_min if sigma_min is None else max(sigma_min, float(model_sampling.sigma_min)))
    hi = float(model_sampling.sigma_max if sigma_max is None else min(sigma_max, float(model_sampling.sigma_max)))
    if not lo < hi:
        raise TrainingError(f"comfy-dg: empty σ range for training ({lo} .. {hi})")
    t = model_sampling.timestep(torch.tensor([lo, hi], dtype=torch.float32))
    return float(t[0]), float(t[1])


def vp_edm_sigma(t):
    """The EDM σ (noise over signal, x/ᾱ½ = x0 + σ·ε) of VP time t: ᾱ = exp(−∫β) and σ = √(1/ᾱ − 1)."""
    integral = VP_BETA_0 * t + 0.5 * (VP_BETA_1 - VP_BETA_0) * t * t
    return math.sqrt(math.expm1(integral))


def vp_importance_edm_sigmas(n, generator):
    """EDM σ of n VP times drawn with the paper's density p(t) ∝ β(t)/σ_VP²(t), σ_VP² = 1 − ᾱ(t), t ∈ [1e-5, 1].

    With B = ∫β, β dt = dB and σ_VP² = 1 − e^(−B), so p dt ∝ dB/(1 − e^(−B)) = d log(e^B − 1) = d log σ²:
    the paper's density is exactly log-uniform in the EDM σ, between σ(1e-5) ≈ 0.0010 and σ(1) ≈ 152.2."""
    lo, hi = math.log(vp_edm_sigma(VP_T_MIN)), math.log(vp_edm_sigma(VP_T_MAX))
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.exp(lo + (hi - lo) * u)


def model_sigma_for_snr(model_sampling, edm_sigma, sigma_lo, sigma_hi, iterations=60):
    """The model's σ with the same signal-to-noise ratio as EDM σ `edm_sigma`, clipped to [sigma_lo, sigma_hi].

    The model's state is x = α(σ)·x0 + σ·ε, so its noise-over-signal is σ/α(σ): σ itself for EPS, V, EDM and X0
    models (α = 1), σ/(1 − σ) for flow models. σ/α rises with σ; bisection in log σ solves σ/α(σ) = edm_sigma,
    and ends at the range's edge when the solution lies outside (clipping)."""
    target = edm_sigma.double().log()
    lo = torch.full_like(target, math.log(sigma_lo))
    hi = torch.full_like(target, math.log(sigma_hi))
    for _ in range(iterations):
        mid = (lo + hi) / 2
        snr_sigma = mid - alpha(model_sampling, mid.exp().float(), floor=1e-12).double().log()
        above = snr_sigma > target
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return ((lo + hi) / 2).exp().float()


def sample_sigmas(model_sampling, t_range, n, generator, sampling="model"):
    """n training σ, drawn as options.TRAINING["sigma_sampling"] says.

    "model": σ = model_sampling.sigma(t) with t uniform over the model's own timestep parameterization, the
    noise levels the model was trained on (uniform t for discrete and flow models, log-uniform σ for EDM ones).
    "vp_importance": the paper's VP importance sampling (vp_importance_edm_sigmas) mapped onto this model by
    equal signal-to-noise ratio (model_sigma_for_snr) and clipped to the trained range: draws beyond an end of
    the range train at that end."""
    t0, t1 = t_range
    if sampling == "vp_importance":
        lo, hi = sorted(float(model_sampling.sigma(torch.tensor(t))) for t in (t0, t1))
        return model_sigma_for_snr(model_sampling, vp_importance_edm_sigmas(n, generator), lo, hi)
    if sampling != "model":
        raise TrainingError(f"comfy-dg: unknown sigma_sampling {sampling!r}; choose model or vp_importance")
    t = t0 + (t1 - t0) * torch.rand(n, generator=generator)
    return model_sampling.sigma(t).to(torch.float32)


def band_edges(model_sampling, t_range, bands):
    """σ edges of `bands` equal slices of the timestep range, low σ first."""
    t0, t1 = t_range
    t = torch.linspace(t0, t1, bands + 1)
    return [float(s) for s in model_sampling.sigma(t)]


def noised_input(model_sampling, x0, sigma, eps):
    """(x, x_in): the sampler-space state and what the diffusion network (and so the discriminator) sees."""
    x = model_sampling.noise_scaling(sigma, eps, x0)
    return x, model_sampling.calculate_input(sigma, x)
