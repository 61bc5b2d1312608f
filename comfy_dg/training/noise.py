"""Noising latents the way the model itself does: σ from the model's own schedule, x = noise_scaling(σ, ε, x0)."""
import torch

from ..errors import TrainingError


def timestep_range(model_sampling, sigma_min=None, sigma_max=None):
    lo = float(model_sampling.sigma_min if sigma_min is None else max(sigma_min, float(model_sampling.sigma_min)))
    hi = float(model_sampling.sigma_max if sigma_max is None else min(sigma_max, float(model_sampling.sigma_max)))
    if not lo < hi:
        raise TrainingError(f"comfy-dg: empty σ range for training ({lo} .. {hi})")
    t = model_sampling.timestep(torch.tensor([lo, hi], dtype=torch.float32))
    return float(t[0]), float(t[1])


def sample_sigmas(model_sampling, t_range, n, generator):
    """σ = model_sampling.sigma(t) with t uniform over the model's own timestep parameterization: the noise
    levels the model was trained on (uniform t for discrete and flow models, log-uniform σ for EDM ones).
    This is our stated alternative to the paper's VP importance sampling, valid for every model type."""
    t0, t1 = t_range
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
