"""Weight schedules w(σ) inside the guidance window.

u ∈ [0, 1] is the position in the window, measured in log σ: 0 where it opens (σ_start, noisiest),
1 where it closes (σ_end). Each schedule returns the factor that multiplies the weight.
"""
import math
import torch

SCHEDULES = {
    "constant": lambda u: torch.ones_like(u),
    "linear_up": lambda u: u,                                   # 0 → w as noise goes down
    "linear_down": lambda u: 1.0 - u,                           # w → 0 as noise goes down
    "cosine": lambda u: 0.5 * (1.0 + torch.cos(math.pi * u)),   # w → 0, cosine-annealed
}


def window_position(sigma: torch.Tensor, sigma_start: float, sigma_end: float,
                    sigma_min: float, sigma_max: float) -> torch.Tensor:
    """u per sample; an open end of the window is taken at the model's own σ range."""
    hi = math.log(max(min(sigma_start, sigma_max), 1e-12))
    lo = math.log(max(sigma_end, sigma_min, 1e-12))
    if hi <= lo:
        return torch.zeros_like(sigma)
    return ((hi - sigma.clamp_min(1e-12).log()) / (hi - lo)).clamp(0.0, 1.0)


def schedule_factor(name: str, u: torch.Tensor) -> torch.Tensor:
    try:
        return SCHEDULES[name](u)
    except KeyError:
        raise ValueError(f"comfy-dg: unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
