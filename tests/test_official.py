"""The official DG sampler, transcribed, against the pack through ComfyUI on an analytic EDM model.

The official code (alsdudrla10/DG, generate.py edm_sampler with classifier_lib.get_grad_log_ratio, read 2026-11) is
EDM's Heun sampler, 18 Karras steps (σ 0.002–80, ρ = 7), with DG added to each evaluation's direction:
    first (Euler) evaluation  d ← d + w₁·g/σ̂,   g = −σ̂²·∇ₓ log r(x̂, σ̂)        (so D' = D + w₁·σ̂²·∇ₓ log r)
    Heun correction           d' ← d' + w₂·g(x', σ')/σ'                         (only when w₂ ≠ 0)
and, with --boosting, a per-sample churn every 5th step for samples whose previous log r < 0 (S_churn = 4) and a
doubled DG term every 2nd step for samples whose current log r < 0. d is clipped to [1e-5, 1 − 1e-5].
The transcription below follows that structure line by line, in float64, on the analytic model of analytic.py
(exact denoiser, exact density ratio); the pack runs through ComfyUI's CFGGuider and KSAMPLER with guide()."""
import math

import pytest
import torch

import comfy.samplers
from comfy.k_diffusion.sampling import sample_heun
from analytic import DATA, MODEL, SHAPE, ExactRatio, analytic_model
from comfy_dg import guide
from comfy_dg.dg import LOGIT_MAX
from comfy_dg.sampling import sample_dg_heun_boosted
from harness.tiny import empty_conditioning

N, SIGMA_MIN, SIGMA_MAX, RHO = 18, 0.002, 80.0, 7.0


def karras():
    ramp = torch.arange(N, dtype=torch.float64) / (N - 1)
    t = (SIGMA_MAX ** (1 / RHO) + ramp * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


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

    t_steps = karras()
    b = latents.shape[0]
    log_ratio = torch.full((b,), math.inf, dtype=torch.float64)
    churned, doubled = [], []
    x_next = latents * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        s_churn = torch.zeros(b, dtype=torch.float64)
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

    def __init__(self, shape, sigmas):
        self.shape, self.sigmas, self.drawn = shape, [float(s) for s in sigmas], {}
        self.g = torch.Generator().manual_seed(5)

    def __call__(self, sigma, sigma_next):
        i = self.sigmas.index(float(sigma))
        self.drawn[i] = torch.randn(self.shape, generator=self.g, dtype=torch.float64)
        return self.drawn[i]

    def at(self, i):
        return self.drawn.get(i, torch.zeros(self.shape, dtype=torch.float64))


def float64(fn, **options):
    """A KSAMPLER that runs the sampler function `fn` in float64 from latents·σ₀, as the official sampler starts
    (current ComfyUI casts the noise to float32 before sampling and the result after), and its float64 result."""
    result = []

    def run(model, x, sigmas, **kwargs):
        result.append(fn(model, model.noise.to(torch.float64) * sigmas[0], sigmas, **kwargs))
        return result[-1]
    run.__name__ = fn.__name__      # the sampler table knows the function by its name
    return comfy.samplers.KSAMPLER(run, extra_options=options), result


def pack_run(latents, w1, w2, fn, **options):
    m = analytic_model("EDM")
    guided = guide(m, ExactRatio(m.model.model_sampling, "EDM"), weight=w1, intermediate_weight=w2)
    guider = comfy.samplers.CFGGuider(guided)
    guider.set_conds(*empty_conditioning(guided))
    guider.set_cfg(1.0)
    sampler, result = float64(fn, **options)
    with torch.inference_mode():
        guider.sample(latents, torch.zeros_like(latents), sampler, karras(), disable_pbar=True, seed=0)
    return result[0]


def latents(seed=3, n=12):
    """float32 values (what ComfyUI passes on), held in float64."""
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.float64)


@pytest.mark.parametrize("w1,w2", [(2.0, 0.0), (1.0, 0.0), (2.0, 1.0), (0.0, 0.0)])
def test_heun_with_dg_is_the_official_sampler(w1, w2):
    z = latents()
    ours = pack_run(z, w1, w2, sample_heun)
    theirs, _, _ = official_edm_sampler(z, w1, w2, boosting=False, churn_noise=lambda i: torch.zeros_like(z))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    if w1:
        plain, _, _ = official_edm_sampler(z, 0.0, 0.0, boosting=False, churn_noise=lambda i: torch.zeros_like(z))
        assert (theirs - plain).abs().max() > 1e-2, "DG changed nothing: the comparison could not fail"


@pytest.mark.parametrize("w1", [1.0, 2.0])
def test_boosting_sampler_is_the_official_boosting(w1):
    z = latents(seed=4, n=16)
    noise = RecordedNoise(z.shape, karras())
    ours = pack_run(z, w1, 0.0, sample_dg_heun_boosted, noise_sampler=noise)
    theirs, churned, doubled = official_edm_sampler(z, w1, 0.0, boosting=True, churn_noise=noise.at)
    assert churned and doubled, "no sample was churned or doubled: boosting was not exercised"
    assert sorted(noise.drawn) == sorted(set(churned))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    unboosted, _, _ = official_edm_sampler(z, w1, 0.0, boosting=False, churn_noise=noise.at)
    assert (theirs - unboosted).abs().max() > 1e-2, "boosting changed nothing: the comparison could not fail"


def test_boosting_sampler_without_guidance_is_plain_heun():
    z = latents(seed=6, n=4)
    m = analytic_model("EDM")
    outs = []
    for fn in (sample_dg_heun_boosted, sample_heun):
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(*empty_conditioning(m))
        guider.set_cfg(1.0)
        sampler, result = float64(fn)
        with torch.inference_mode():
            guider.sample(z, torch.zeros_like(z), sampler, karras(), disable_pbar=True, seed=0)
        outs.append(result[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
