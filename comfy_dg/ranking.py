"""Rank by realism: score finished samples with a discriminator and keep the most realistic ones.

A sample's score is the discriminator's log r = log(d/(1−d)) of it, noised to one low σ the way the model noises
(x = α(σ)·x0 + σ·ε, as in training), averaged over a few noise draws from a fixed seed. Higher is more like
the real data. Only the order of the scores at one σ matters, so a constant offset in log r (which the
reconstruction objective leaves free) does not change the ranking.
"""
import torch

from . import identity
from .dg import LOGIT_MAX
from .errors import DataError, OptionError
from .patch import bound, check_discriminator

DEFAULT_SIGMA = 0.1


def realism_scores(model_patcher, discriminator, latents, sigma=DEFAULT_SIGMA, draws=4, seed=0, class_label=-1,
                   batch_size=64, class_name=""):
    """log r per latent (N,), float32 on the CPU. `latents` (N, C, H, W) as samplers and VAE Encode return them;
    σ is clipped to the model's range. A class-conditional discriminator judges against class_label, or the class
    called class_name."""
    import comfy.model_management

    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or len(latents) == 0:
        raise DataError(f"comfy-dg: rank by realism takes a batch of latents (N, C, H, W); got "
                        f"{tuple(getattr(latents, 'shape', ()))}")
    if draws < 1:
        raise OptionError(f"comfy-dg: draws must be ≥ 1, got {draws}")
    base = model_patcher.model
    channels = identity.latent_channels(base)
    if latents.shape[1] != channels:
        raise DataError(f"comfy-dg: these latents have {latents.shape[1]} channels but the model's latent space has "
                        f"{channels}: rank latents of this model (or images with its VAE).")
    class_label = check_discriminator(base, discriminator, class_label, class_name)
    ms = base.model_sampling
    sigma = min(max(float(sigma), float(ms.sigma_min)), float(ms.sigma_max))
    device = torch.device(model_patcher.load_device)
    comfy.model_management.load_models_gpu([model_patcher])
    movable = isinstance(discriminator, torch.nn.Module)
    if movable:
        with torch.inference_mode(False):
            discriminator.to(device)
    try:
        x0 = base.process_latent_in(latents.detach().float().cpu())
        g = torch.Generator().manual_seed(seed)
        total = torch.zeros(len(x0), dtype=torch.float64)
        with torch.no_grad():
            for _ in range(draws):
                eps = torch.randn(x0.shape, generator=g)
                for i in range(0, len(x0), batch_size):
                    xb, eb = x0[i:i + batch_size].to(device), eps[i:i + batch_size].to(device)
                    s = torch.full((len(xb),), sigma, device=device)
                    labels = None if class_label < 0 else torch.full((len(xb),), class_label, device=device)
                    x_in = ms.calculate_input(s, ms.noise_scaling(s, eb, xb))
                    logit = bound(discriminator, base, labels)(x_in, s).reshape(-1)
                    # clipped as guiding clips it (dg.LOGIT_MAX)
                    total[i:i + len(xb)] += logit.float().clamp(-LOGIT_MAX, LOGIT_MAX).double().cpu()
    finally:
        if movable:
            with torch.inference_mode(False):
                discriminator.to(model_patcher.offload_device)
    return (total / draws).float()


def keep_best(scores, k):
    """Indices of the k highest scores, best first (ties: the earlier sample first)."""
    k = max(1, min(int(k), len(scores)))
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(order[:k], dtype=torch.long)
