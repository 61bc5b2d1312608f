"""Discriminator rejection sampling, in the spirit of DiffRS (Na et al., "Diffusion Rejection Sampling", ICML 2024).

Each step of the sampler is a proposal x' at σ_{i+1} from x at σ_i (an Euler or Heun step of the probability-flow
ODE, as k-diffusion's samplers take it). If the forward noising of the model and of the data are alike, the true
reverse transition over the model's one is

    q(x'|x) / p(x'|x) = r_{i+1}(x') / r_i(x),     r = p_data,σ / p_model,σ = d / (1 − d),

so the proposal is accepted with probability min(1, r_{i+1}(x') / (M_{i+1} · r_i(x))). A rejected proposal is
noised back to σ_i the way the model noises (x_i = α_i/α_{i+1}·x' + √(σ_i² − (α_i σ_{i+1}/α_{i+1})²)·ε,
DiffRS's re-initialisation; needed since an ODE step from the same x would propose the same x') and proposed
again.

Our choices, where DiffRS estimates things offline: M_{i+1} is the `quantile` of the batch's first proposals'
ratios at that step (so about 1 − quantile of them pass for sure and the rest with probability ratio / M); a
sample is accepted anyway after `max_retries` rejections at one step, which bounds the cost; the last step (to
σ = 0) is never judged. Each sample moves down the schedule at its own pace: the model is called with per-sample σ.
"""
import logging
import math

import torch

from . import parameterization
from .dg import LOGIT_MAX
from .errors import OptionError
from .patch import bound, check_discriminator, runs_of

BASES = ("heun", "euler")

log = logging.getLogger("comfy_dg")


def renoise(model_sampling, x, sigma_from, sigma_to, noise):
    """x at σ_from noised forward to σ_to > σ_from (per sample), as x = α·x0 + σ·ε noises. α is the model's own,
    unfloored (guiding's floor is for dividing by α; here α(σ_from) > α(σ_to) ≥ 0)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    a_from = parameterization.alpha(model_sampling, sigma_from, floor=0.0).reshape(shape)
    a_to = parameterization.alpha(model_sampling, sigma_to, floor=0.0).reshape(shape)
    ratio = a_to / a_from
    std = (sigma_to.reshape(shape) ** 2 - (ratio * sigma_from.reshape(shape)) ** 2).clamp_min(0).sqrt()
    return ratio * x + std * noise


class Counter:
    """Model and discriminator evaluations per sample, for benchmarks."""

    def __init__(self):
        self.model, self.discriminator, self.rejections, self.samples = 0, 0, 0, 0


def sample_dg_rejection(model, x, sigmas, extra_args=None, callback=None, disable=None, discriminator=None,
                        base="heun", quantile=0.9, max_retries=4, class_label=-1, class_name="", counter=None):
    """A k-diffusion-style sampler function (for comfy.samplers.KSAMPLER) with discriminator rejection."""
    extra_args = {} if extra_args is None else extra_args
    if extra_args.get("denoise_mask") is not None:
        raise OptionError("comfy-dg: the DG rejection sampler does not support inpainting (a noise mask): its "
                          "samples move at their own pace, and the mask belongs to the whole batch. Use another "
                          "sampler.")
    base_model = model.inner_model.inner_model         # KSamplerX0Inpaint → guider → the BaseModel
    ms = base_model.model_sampling
    parameterization.check_supported(ms)               # re-noising assumes x = α·x0 + σ·ε, as guiding does
    class_label = check_discriminator(base_model, discriminator, class_label, class_name)
    if isinstance(discriminator, torch.nn.Module):
        with torch.inference_mode(False):
            discriminator.to(x.device)
    g = torch.Generator().manual_seed(int(extra_args.get("seed", 0) or 0) + 7919)
    n_steps, batch = len(sigmas) - 1, x.shape[0]
    sigmas = sigmas.to(x.device)
    counter = counter if counter is not None else Counter()
    counter.samples += batch
    if batch == 1 and max_retries > 0 and n_steps > 1:
        log.warning("comfy-dg: the DG rejection sampler sets each step's threshold M from the batch's own proposals; "
                    "with a batch of 1 every proposal meets it, so nothing is rejected and this is plain %s. "
                    "Sample a batch (8 or more) to let the discriminator reject.", base)

    def log_r(xs, s):
        counter.discriminator += len(xs)
        labels = None if class_label < 0 else torch.full((len(xs),), class_label, device=xs.device)
        logit = bound(discriminator, base_model, labels)(ms.calculate_input(s, xs), s)
        return logit.reshape(-1).float().clamp(-LOGIT_MAX, LOGIT_MAX)      # clipped as guiding clips it

    # Discriminator Guidance patches on the model are told which evaluation of a step each call is (their
    # intermediate_weight), since this sampler's callbacks cannot number steps (steps.DECLARE_THEIR_EVALUATIONS).
    runs = runs_of(extra_args)

    def denoise(xs, s, first):
        counter.model += len(xs)
        for run in runs:
            run.first_evaluation = first
        return model(xs, s, **extra_args)

    x = x.clone()
    idx = torch.zeros(batch, dtype=torch.long, device=x.device)      # sample b is at σ = sigmas[idx[b]]
    retries = torch.zeros_like(idx)
    lr = log_r(x, sigmas[idx]) if n_steps > 1 else torch.zeros(batch, device=x.device)
    log_m = {}                                                       # step index → log M
    shown = -1
    last_denoised = torch.zeros_like(x)
    while bool((idx < n_steps).any()):
        act = (idx < n_steps).nonzero().reshape(-1)
        i = idx[act]
        s, s_next = sigmas[i], sigmas[i + 1]
        shape = (-1,) + (1,) * (x.ndim - 1)
        xa = x[act]
        denoised = denoise(xa, s, True)
        last_denoised[act] = denoised
        d = (xa - denoised) / s.reshape(shape)
        dt = (s_next - s).reshape(shape)
        proposal = xa + d * dt
        last = s_next == 0
        if base == "heun" and bool((~last).any()):
            # Heun's correction where σ_{i+1} > 0 (the last step is an Euler step, as in k-diffusion).
            h = (~last).nonzero().reshape(-1)
            denoised_2 = denoise(proposal[h], s_next[h], False)
            d_2 = (proposal[h] - denoised_2) / s_next[h].reshape(shape)
            proposal[h] = xa[h] + (d[h] + d_2) / 2 * dt[h]
        accept = last.clone()
        judged = (~last).nonzero().reshape(-1)
        lr_next = torch.zeros(len(act), device=x.device)
        if len(judged):
            lr_next[judged] = log_r(proposal[judged], s_next[judged])
            ratio = lr_next[judged] - lr[act[judged]]
            first = retries[act[judged]] == 0
            for step in torch.unique(i[judged]).tolist():
                if step not in log_m:
                    at = (i[judged] == step) & first
                    if bool(at.any()):
                        log_m[step] = float(torch.quantile(ratio[at].double(), quantile))
            m = torch.tensor([log_m.get(k, math.inf) for k in i[judged].tolist()], device=x.device)
            p = torch.exp((ratio - m).clamp(max=0.0))
            u = torch.rand(len(judged), generator=g).to(x.device)
            accept[judged] = (u < p) | (retries[act[judged]] >= max_retries)
        ok, no = act[accept], act[~accept]
        x[ok] = proposal[accept]
        lr[ok] = lr_next[accept]
        idx[ok] += 1
        retries[ok] = 0
        if len(no):
            counter.rejections += len(no)
            eps = torch.randn(x[no].shape, generator=g).to(x.device, x.dtype)
            back = renoise(ms, proposal[~accept], s_next[~accept], s[~accept], eps)
            x[no] = back
            lr[no] = log_r(back, s[~accept])
            retries[no] += 1
        done = int(idx.min())
        if callback is not None and done > shown:
            shown = done
            callback({"x": x, "i": min(done, n_steps - 1), "sigma": sigmas[min(done, n_steps - 1)],
                      "sigma_hat": sigmas[min(done, n_steps - 1)], "denoised": last_denoised})
    return x


def dg_rejection_sampler(discriminator, base="heun", quantile=0.9, max_retries=4, *, class_label=-1, class_name="",
                         counter=None):
    """A ComfyUI SAMPLER (for SamplerCustomAdvanced) that samples with discriminator rejection; a class-conditional
    discriminator judges against class_label, or the class called class_name."""
    import comfy.samplers
    if not 0.0 <= quantile <= 1.0 or math.isnan(quantile):
        raise OptionError(f"comfy-dg: quantile must be within 0..1, got {quantile}")
    if max_retries < 0:
        raise OptionError(f"comfy-dg: max_retries must be ≥ 0, got {max_retries}")
    if base not in BASES:
        raise OptionError(f"comfy-dg: unknown base sampler {base!r} ({' or '.join(BASES)})")
    return comfy.samplers.KSAMPLER(sample_dg_rejection, extra_options={
        "discriminator": discriminator, "base": base, "quantile": quantile, "max_retries": max_retries,
        "class_label": class_label, "class_name": class_name, "counter": counter})
