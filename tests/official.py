"""The official DG sampler, transcribed, and what it takes to run the pack the same way through ComfyUI.

The official code (alsdudrla10/DG, generate.py edm_sampler with classifier_lib.get_grad_log_ratio, read 2026-11) is
EDM's Heun sampler, 18 Karras steps (σ 0.002–80, ρ = 7), with DG added to each evaluation's direction:
    first (Euler) evaluation  d ← d + w₁·g/σ̂,   g = −σ̂²·∇ₓ log r(x̂, σ̂)        (so D' = D + w₁·σ̂²·∇ₓ log r)
    Heun correction           d' ← d' + w₂·g(x', σ')/σ'                         (only when w₂ ≠ 0)
and, with --boosting, a per-sample churn every 5th step for samples whose previous log r < 0 (S_churn = 4) and a
doubled DG term every 2nd step for samples whose current log r < 0. d is clipped to [1e-5, 1 − 1e-5].
The transcription below follows that structure line by line on the analytic model of analytic.py (exact denoiser,
exact density ratio), in the dtype and on the device of the latents it is given. Used by test_official (float64,
the CPU) and test_device_correctness (ComfyUI's device, float64 and float32)."""
import math

import torch

import comfy.samplers
from analytic import DATA, MODEL, ExactRatio, analytic_model
from comfy_dg import guide
from comfy_dg.dg import LOGIT_MAX
from harness.tiny import empty_conditioning

N, SIGMA_MIN, SIGMA_MAX, RHO = 18, 0.002, 80.0, 7.0


def karras(dtype=torch.float64, device="cpu"):
    ramp = torch.arange(N, dtype=dtype, device=device) / (N - 1)
    t = (SIGMA_MAX ** (1 / RHO) + ramp * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    return torch.cat([t, torch.zeros(1, dtype=dtype, device=device)])


def official_edm_sampler(latents, w1, w2, boosting, churn_noise):
    """generate.py's edm_sampler on the analytic model: net = MODEL's posterior mean, discriminator = the exact
    ratio. churn_noise(i) is the fresh noise of step i (the official code draws randn_like every step; it only
    matters where γ > 0)."""
    def net(x, t):
        return MODEL.posterior_mean(x.flatten(1), t, torch.ones_like(t)).reshape(x.shape)

    def grad_log_ratio(x, t):
        with torch.enable_grad():
            x_ = x.detach().clone().requires_grad_(True)
            ratio = DATA.log_density(x_.flatten(1), t, torch.ones_like(t)) \
                - MODEL.log_density(x_.flatten(1), t, torch.ones_like(t))
            log_ratio = ratio.clamp(-LOGIT_MAX, LOGIT_MAX)           # d clipped to [1e-5, 1 − 1e-5]
            (score,) = torch.autograd.grad(log_ratio.sum(), x_)
        return -(t[:, None, None, None] ** 2) * score, log_ratio.detach()

    like = {"dtype": latents.dtype, "device": latents.device}
    t_steps = karras(**like)
    b = latents.shape[0]
    log_ratio = torch.full((b,), math.inf, **like)
    churned, doubled = [], []
    x_next = latents * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        s_churn = torch.zeros(b, **like)
        if boosting and i % 5 == 0:
            s_churn[log_ratio < 0] = 4.0
        gamma = torch.minimum(s_churn / N, torch.full_like(s_churn, math.sqrt(2) - 1))
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt()[:, None, None, None] * churn_noise(i)
        churned += [i] * int((gamma > 0).sum())
        d_cur = (x_hat - net(x_hat, t_hat)) / t_hat[:, None, None, None]
        if w1 != 0:
            guidance, log_ratio = grad_log_ratio(x_hat, t_hat)
            if boosting and i % 2 == 0:
                guidance[log_ratio < 0] *= 2.0
                doubled += [i] * int((log_ratio < 0).sum())
            d_cur = d_cur + w1 * guidance / t_hat[:, None, None, None]
        x_next = x_hat + (t_next - t_hat)[:, None, None, None] * d_cur
        if i < N - 1:
            t_n = t_next.expand(b)
            d_prime = (x_next - net(x_next, t_n)) / t_next
            if w2 != 0:
                d_prime = d_prime + w2 * grad_log_ratio(x_next, t_n)[0] / t_next
            x_next = x_hat + (t_next - t_hat)[:, None, None, None] * (0.5 * d_cur + 0.5 * d_prime)
    return x_next, churned, doubled


class RecordedNoise:
    """A noise sampler for the pack's sampler that remembers what it drew at each step (by σ)."""

    def __init__(self, shape, sigmas, dtype=torch.float64, device="cpu"):
        self.shape, self.sigmas, self.drawn = shape, [float(s) for s in sigmas], {}
        self.like = {"dtype": dtype, "device": device}
        self.g = torch.Generator().manual_seed(5)

    def __call__(self, sigma, sigma_next):
        i = self.sigmas.index(float(sigma))
        self.drawn[i] = torch.randn(self.shape, generator=self.g, dtype=torch.float64).to(**self.like)
        return self.drawn[i]

    def at(self, i):
        return self.drawn.get(i, torch.zeros(self.shape, **self.like))


def exact_sampler(fn, dtype=torch.float64, **options):
    """A KSAMPLER that runs the sampler function `fn` in `dtype` from latents·σ₀, as the official sampler starts,
    and its result in that dtype. ComfyUI 0.33 casts the noise to float32 before sampling (CFGGuider.outer_sample),
    and k-diffusion's samplers then pass σ to the model as σᵢ·s_in with s_in = x.new_ones(B), i.e. rounded to
    float32 at every evaluation, whatever the sigmas' dtype; a sampler started from a float64 state evaluates at
    the float64 σ, as the official code does. ComfyUI also returns the result in float32."""
    result = []

    def run(model, x, sigmas, **kwargs):
        result.append(fn(model, model.noise.to(dtype) * sigmas[0], sigmas, **kwargs))
        return result[-1]
    run.__name__ = fn.__name__      # the sampler table knows the function by its name
    return comfy.samplers.KSAMPLER(run, extra_options=options), result


def pack_sampler(latents, w1, w2, fn, **options):
    """The pack's run of the same thing: the analytic EDM model guided by the exact ratio with guide() (w₁ = weight,
    w₂ = intermediate_weight), sampled through ComfyUI's CFGGuider with the sampler function `fn` (sample_heun, or
    the pack's boosting sampler) on the Karras steps, in the latents' dtype and on their device."""
    m = analytic_model("EDM", latents.dtype)
    guided = guide(m, ExactRatio(m.model.model_sampling, "EDM"), weight=w1, intermediate_weight=w2)
    guider = comfy.samplers.CFGGuider(guided)
    guider.set_conds(*empty_conditioning(guided))
    guider.set_cfg(1.0)
    sampler, result = exact_sampler(fn, latents.dtype, **options)
    with torch.inference_mode():
        guider.sample(latents, torch.zeros_like(latents), sampler, karras(latents.dtype, latents.device),
                      disable_pbar=True, seed=0)
    return result[0]
