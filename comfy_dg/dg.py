"""Discriminator guidance, the paper's math (Kim et al., ICML 2023), in ComfyUI's sampler space.

A discriminator d(x, σ) tells noised real data (d → 1) from noised model samples (d → 0). Its density-ratio
estimate log r = log d/(1 − d) corrects the model's score (Theorem 1: s_θ + ∇ₓ log r = ∇ₓ log p_data,σ), and
with x = α·x0 + σ·ε the score is (α·D − x)/σ², so a score correction Δs moves the denoiser by σ²/α·Δs:

    D'(x, σ) = D(x, σ) + w(σ) · σ²/α(σ) · ∇ₓ log r(x, σ)

Every function here is pure torch on per-sample tensors: σ, α, w and log r have shape (B,), x and ∇ₓ log r
(B, ...). The ComfyUI hooks that call them live in patch.py.
"""
import math

import torch

from .errors import DGError

D_CLIP = 1e-5
# d is clipped to [1e-5, 1 − 1e-5] (as the official code does), i.e. log r to ±LOGIT_MAX; beyond it ∇ log r = 0.
LOGIT_MAX = math.log((1.0 - D_CLIP) / D_CLIP)
# The safety valve: a correction that moves any element by more than MAX_SHIFT·(1 + σ/α) is no sound
# discriminator's (those move D by a few σ/α at most); such samples are left unguided, like non-finite ones.
# Loose enough never to touch Theorem 1's exact ratio.
MAX_SHIFT = 1e3


def gradient_dtype(x: torch.Tensor) -> torch.dtype:
    """∇ log r is taken in float32 at least, whatever the model runs in; float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh copy of x to differentiate log r with respect to (call with inference mode off, grad on)."""
    return x.detach().clone().to(gradient_dtype(x)).requires_grad_(True)


def log_ratio_and_grad(logit: torch.Tensor, x: torch.Tensor, retain_graph: bool = False):
    """(log r, ∇ₓ log r) of the discriminator's logit log(d/(1−d)) of shape (B,), with d clipped to
    [D_CLIP, 1 − D_CLIP]: the gradient is zero where the clip is active. `x` is the leaf the logit was computed
    from."""
    if logit.shape != (x.shape[0],):
        if logit.numel() != x.shape[0]:
            raise DGError(f"comfy-dg: the discriminator must return one logit per sample, shape ({x.shape[0]},); "
                          f"it returned {tuple(logit.shape)}")
        logit = logit.reshape(-1)
    (grad,) = torch.autograd.grad(logit.clamp(-LOGIT_MAX, LOGIT_MAX).sum(), x, retain_graph=retain_graph)
    return logit.detach(), grad.detach()


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, 1, ...) to broadcast against a (B, ...) tensor."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def correction(grad: torch.Tensor, w: torch.Tensor, sigma: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ΔD = w·σ²/α·∇ₓ log r."""
    return per_sample(w * sigma ** 2 / alpha, grad) * grad


def boosted(w: torch.Tensor, log_r: torch.Tensor, boost) -> torch.Tensor:
    """w multiplied by `boost` (a number or (B,)) for the samples the discriminator judges fake (log r < 0)."""
    return torch.where(log_r < 0, w * boost, w)


def usable(delta: torch.Tensor, log_r: torch.Tensor, sigma: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(B,) bool: samples whose log r and correction are finite and within MAX_SHIFT·(1 + σ/α) on every element."""
    shift = delta.flatten(1).abs().amax(dim=1)
    return torch.isfinite(delta).flatten(1).all(dim=1) & torch.isfinite(log_r) \
        & (shift <= MAX_SHIFT * (1.0 + sigma / alpha))


# --- w(σ): how the weight varies inside the guidance window ---------------------------------------------------
# u ∈ [0, 1] is the position in the window in log σ: 0 where it opens (σ_start, noisiest), 1 where it closes.
SCHEDULES = {
    "constant": lambda u: torch.ones_like(u),
    "linear_up": lambda u: u,                                   # 0 → w as noise goes down
    "linear_down": lambda u: 1.0 - u,                           # w → 0 as noise goes down
    "cosine": lambda u: 0.5 * (1.0 + torch.cos(math.pi * u)),   # w → 0, cosine-annealed
}


def window_position(sigma: torch.Tensor, sigma_hi: float, sigma_lo: float) -> torch.Tensor:
    """u per sample, for a window from σ_hi (u = 0) down to σ_lo (u = 1)."""
    hi, lo = math.log(max(sigma_hi, 1e-12)), math.log(max(sigma_lo, 1e-12))
    if hi <= lo:
        return torch.zeros_like(sigma)
    return ((hi - sigma.clamp_min(1e-12).log()) / (hi - lo)).clamp(0.0, 1.0)


def scheduled(w: float, schedule: str, u: torch.Tensor) -> torch.Tensor:
    """w(σ) = w · schedule(u)."""
    return w * SCHEDULES[schedule](u)
