"""The pack's sampler: EDM's Heun sampler with the official DG code's boosting, in k-diffusion's form.

Boosting (Kim et al. 2023, official code): the discriminator's own verdict steers extra effort to the samples it
judges fake (log r < 0). Every `churn_every`-th step those samples, as judged at the previous step, get fresh
noise (EDM's churn: γ = min(S_churn/N, √2 − 1), σ̂ = σ·(1 + γ), per sample); every `double_every`-th step their
DG weight is doubled on the step's first (Euler) evaluation. Without a Discriminator Guidance patch on the model it
is EDM's plain Heun sampler.
"""
import math

import torch
from tqdm.auto import trange

from .patch import runs_of


def _log_r(runs, n, device):
    """log r per sample from the last evaluation, summed over the guidance patches (+inf: no verdict)."""
    total = torch.full((n,), math.inf, device=device, dtype=torch.float64)
    for run in runs:
        if run.log_r is not None:
            total = torch.where(torch.isinf(total), run.log_r.to(total), total + run.log_r.to(total))
    return total


@torch.no_grad()
def sample_dg_heun_boosted(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=4.0,
                           churn_every=5, double_every=2, noise_sampler=None):
    from comfy.k_diffusion.sampling import default_noise_sampler, to_d

    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed")) if noise_sampler is None else noise_sampler
    runs = runs_of(extra_args)
    n = len(sigmas) - 1
    s_in = x.new_ones([x.shape[0]])
    judged = torch.full((x.shape[0],), math.inf, device=x.device, dtype=torch.float64)   # log r at the last step
    for i in trange(n, disable=disable):
        sigma = sigmas[i] * s_in
        if i % churn_every == 0:
            gamma = (judged < 0).to(sigma) * min(s_churn / n, 2 ** 0.5 - 1)
            sigma = sigma + gamma * sigma                                                    # σ̂ per sample
            if bool((gamma > 0).any()):
                eps = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + eps * (sigma ** 2 - sigmas[i] ** 2).sqrt().reshape(-1, *[1] * (x.ndim - 1))
        for run in runs:
            run.boost = 2.0 if i % double_every == 0 else 1.0
        denoised = model(x, sigma, **extra_args)
        judged = _log_r(runs, x.shape[0], x.device)
        for run in runs:
            run.boost = 1.0
        d = to_d(x, sigma, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma, "denoised": denoised})
        dt = (sigmas[i + 1] - sigma).reshape(-1, *[1] * (x.ndim - 1))
        if sigmas[i + 1] == 0:
            x = x + d * dt                                                                   # Euler step
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt                                                       # Heun step
    return x
