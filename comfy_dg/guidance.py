"""Discriminator guidance as a ComfyUI model patch.

    D'(x, σ) = D(x, σ) + w(σ) · σ²/α(σ) · ∇ₓ log r(x, σ),    log r = log(d / (1 − d))

The correction runs in ComfyUI's post-CFG hook list (so it chains with other patches and runs for KSampler
and every SamplerCustomAdvanced guider, at any cfg), once per model evaluation, per sample.
"""
import logging
import math
import uuid
from dataclasses import dataclass

import torch

from . import parameterization
from .shared_forward import SharedForward
from .schedules import SCHEDULES, schedule_factor, window_position
from .steps import StepTracker, sampler_name
from .tensors import autograd_weights, gradient_dtype

log = logging.getLogger("comfy_dg")

D_CLIP = 1e-5
# d clipped to [1e-5, 1 − 1e-5] is log r clipped to ±log((1 − 1e-5)/1e-5); outside, ∇ log r = 0.
LOGIT_MAX = math.log((1.0 - D_CLIP) / D_CLIP)
TRACKERS_KEY = "comfy_dg_step_trackers"
# A correction that moves any latent element by more than MAX_SHIFT·(1 + σ/α) is no sound discriminator's (those
# move the denoised estimate by a few σ/α at most): treated as unusable, like a non-finite one, so a finite but
# absurd gradient cannot throw x out of the model's numeric range. Loose enough never to touch Theorem 1's ratio.
MAX_SHIFT = 1e3


@dataclass(frozen=True)
class DGOptions:
    weight: float = 1.0                 # w
    start_percent: float = 0.0          # window opens here (percent of the model's σ schedule)
    end_percent: float = 1.0            # and closes here
    schedule: str = "constant"          # w(σ) inside the window: constant, linear_up, linear_down, cosine
    boost: float = 1.0                  # weight multiplier for samples with log r < 0 (1 = off)
    first_evaluation_only: bool = False  # guide only each step's first model evaluation
    class_label: int = -1               # for a class-conditional discriminator: the class to guide toward (-1: none)

    def validate(self):
        if not math.isfinite(self.weight):
            raise ValueError(f"comfy-dg: weight must be a finite number, got {self.weight}")
        for name in ("start_percent", "end_percent"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"comfy-dg: {name} must be within 0..1, got {v}")
        if self.start_percent > self.end_percent:
            raise ValueError(
                f"comfy-dg: start_percent ({self.start_percent}) is after end_percent ({self.end_percent}); "
                "the window runs from start_percent (noisy) to end_percent (clean): swap them.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"comfy-dg: unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.boost) and self.boost >= 0.0):
            raise ValueError(f"comfy-dg: boost must be ≥ 0 (1 = off), got {self.boost}")
        if type(self.class_label) is not int or self.class_label < -1:
            raise ValueError(f"comfy-dg: class_label must be -1 (none) or a class index, got {self.class_label}")
        return self

    def check_labels(self, discriminator):
        classes = getattr(getattr(discriminator, "info", None), "num_classes", 0)
        if self.class_label >= 0 and not classes:
            raise ValueError(f"comfy-dg: class_label {self.class_label} was given but the discriminator is not "
                             "class-conditional; set class_label to -1.")
        if self.class_label >= classes > 0:
            raise ValueError(f"comfy-dg: class_label {self.class_label} is out of range: the discriminator knows "
                             f"classes 0..{classes - 1}.")


def log_ratio_and_grad(discriminator, model_sampling, x: torch.Tensor, sigma: torch.Tensor):
    """(log r, ∇ₓ log r) per sample, with log r clipped as d is.

    `discriminator(x_in, sigma)` sees what the diffusion network sees, x_in = calculate_input(σ, x), and
    returns the logit log(d/(1−d)) of shape (B,). Autograd carries the gradient back through
    calculate_input to the sampler-space x. ComfyUI samples under inference mode, so the graph is built
    on fresh tensors with inference mode off.
    """
    dtype = gradient_dtype(x)
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().to(dtype).requires_grad_(True)
        sg = sigma.detach().clone().to(device=x.device, dtype=dtype)
        x_in = model_sampling.calculate_input(sg, xg)
        logit = discriminator(x_in, sg)
        if logit.shape != (x.shape[0],) and logit.numel() == x.shape[0]:
            logit = logit.reshape(-1)
        if logit.shape != (x.shape[0],):
            raise ValueError(f"comfy-dg: the discriminator must return one logit per sample, shape "
                             f"({x.shape[0]},); it returned {tuple(logit.shape)}")
        (grad,) = torch.autograd.grad(logit.clamp(-LOGIT_MAX, LOGIT_MAX).sum(), xg)
    return logit.detach(), grad.detach()


def _resolve(discriminator, base_model, labels=None):
    """The pack's discriminators bind to the model (the features one needs its network) and to the class
    labels; any other module is used as-is."""
    bind = getattr(discriminator, "bind", None)
    return bind(base_model, labels) if callable(bind) else discriminator


class GuidancePatch:
    """The post-CFG hook. One per guide() call; per-run state lives in the run's transformer_options."""

    def __init__(self, discriminator, options: DGOptions):
        self.discriminator = discriminator
        self.options = options
        self.key = f"comfy_dg_{uuid.uuid4().hex[:8]}"
        self.warned_nonfinite = False
        # A features head trained under the user's negative prompt reads the sampler's own uncond forward.
        self.shared = None
        if getattr(discriminator, "tap", None) == "unet_middle" and getattr(discriminator, "conditioning", None):
            self.shared = SharedForward(discriminator, self._will_guide, self._to, self._labels, LOGIT_MAX)

    # --- device management: the discriminator follows the model's device and goes back with it ----
    def _to(self, device):
        d = self.discriminator
        if isinstance(d, torch.nn.Module):
            p = next(d.parameters(), None)
            p = next(d.buffers(), None) if p is None else p
            if p is not None and p.device != device:
                with torch.inference_mode(False):   # moved tensors must be usable by autograd
                    d.to(device)
            # A discriminator built or loaded under ComfyUI's inference mode (e.g. trained in the same graph)
            # has inference-tensor weights, which cannot take part in a backward pass.
            autograd_weights(d)

    def offload(self, model_patcher):
        self._to(torch.device(model_patcher.offload_device))

    def _labels(self, n, device):
        label = self.options.class_label
        return None if label < 0 else torch.full((n,), label, device=device)

    def _tracker(self, model_options):
        return model_options.get("transformer_options", {}).get(TRACKERS_KEY, {}).get(self.key)

    def _window(self, model_sampling, sigma):
        """(σ_start, σ_end, which samples' σ lie inside the window)."""
        sigma_start, sigma_end = parameterization.sigma_window(model_sampling, self.options.start_percent,
                                                               self.options.end_percent)
        return sigma_start, sigma_end, (sigma <= sigma_start) & (sigma >= sigma_end)

    def _will_guide(self, base_model, model_options, sigma) -> bool:
        """Whether the hook will correct this evaluation (no side effects: the shared forward asks first)."""
        opts = self.options
        if opts.weight == 0.0:
            return False
        tracker = self._tracker(model_options)
        if opts.first_evaluation_only and tracker is not None and not tracker.peek():
            return False
        return bool(self._window(base_model.model_sampling, sigma)[2].any())

    # --- the hook ------------------------------------------------------------------------------------
    def __call__(self, args):
        denoised = args["denoised"]
        opts = self.options
        tracker = self._tracker(args["model_options"])
        if opts.first_evaluation_only and tracker is not None and not tracker.on_evaluation():
            return denoised
        if opts.weight == 0.0:
            return denoised

        x, sigma, base_model = args["input"], args["sigma"], args["model"]
        ms = base_model.model_sampling
        sigma = sigma.reshape(-1)
        if sigma.numel() == 1 and x.shape[0] > 1:
            sigma = sigma.expand(x.shape[0])
        sigma_start, sigma_end, active = self._window(ms, sigma)
        if not bool(active.any()):
            return denoised
        rows = active.nonzero().reshape(-1)

        shared = self.shared.take(x, sigma) if self.shared is not None else None
        xs, ss = x[rows], sigma[rows]
        if shared is not None:
            logit, grad = shared[0][rows], shared[1][rows]
        else:
            self._to(x.device)
            fn = _resolve(self.discriminator, base_model, self._labels(len(rows), x.device))
            logit, grad = log_ratio_and_grad(fn, ms, xs, ss)

        sigma_min, sigma_max = parameterization.sigma_range(ms)
        u = window_position(ss.to(grad.dtype), sigma_start, sigma_end, sigma_min, sigma_max)
        w = opts.weight * schedule_factor(opts.schedule, u)
        if opts.boost != 1.0:
            w = torch.where(logit < 0, w * opts.boost, w)
        scale = w * parameterization.denoised_scale(ms, ss.to(grad.dtype))
        correction = scale.reshape(-1, *([1] * (grad.ndim - 1))) * grad

        s = ss.to(grad.dtype)
        limit = MAX_SHIFT * (1.0 + s / parameterization.alpha(ms, s).clamp_min(parameterization.ALPHA_MIN))
        shift = correction.flatten(1).abs().amax(dim=1)
        finite = torch.isfinite(correction).flatten(1).all(dim=1) & torch.isfinite(logit) & (shift <= limit)
        if not bool(finite.all()):
            if not self.warned_nonfinite:
                log.warning("comfy-dg: the discriminator gave a non-finite or absurdly large (> %g·(1 + σ/α)) "
                            "log r or gradient for %d of %d samples at σ=%s; those samples get no correction.",
                            MAX_SHIFT,
                            int((~finite).sum()), len(finite), [round(float(s), 4) for s in ss[~finite]])
                self.warned_nonfinite = True
            correction = torch.where(finite.reshape(-1, *([1] * (grad.ndim - 1))), correction,
                                     torch.zeros_like(correction))

        out = denoised.clone()
        out[rows] = (denoised[rows].to(correction.dtype) + correction).to(denoised.dtype)
        return out

    # --- per-run step tracking (SAMPLER_SAMPLE wrapper) ------------------------------------------------
    def sampler_wrapper(self, executor, guider, sigmas, extra_args, callback, *rest, **kwargs):
        self.warned_nonfinite = False
        if not self.options.first_evaluation_only:
            return executor(guider, sigmas, extra_args, callback, *rest, **kwargs)
        tracker = StepTracker(sampler_name(executor.class_obj), sigmas)
        to = extra_args["model_options"].setdefault("transformer_options", {})
        to[TRACKERS_KEY] = {**to.get(TRACKERS_KEY, {}), self.key: tracker}

        def step_callback(i, denoised, x, total_steps):
            tracker.on_callback(i)
            if callback is not None:
                return callback(i, denoised, x, total_steps)

        return executor(guider, sigmas, extra_args, step_callback, *rest, **kwargs)


def guide(model, discriminator, weight: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0,
          schedule: str = "constant", boost: float = 1.0, first_evaluation_only: bool = False,
          class_label: int = -1):
    """A clone of the ModelPatcher `model` whose denoiser is guided by `discriminator`.

    `discriminator` is one of the pack's discriminators (see load_discriminator) or any torch.nn.Module
    called as discriminator(x_in, sigma) -> logit log(d/(1−d)) of shape (B,), where
    x_in = model_sampling.calculate_input(sigma, x) and sigma has shape (B,). For a class-conditional
    discriminator, class_label picks the class to guide toward (-1: unconditional).
    """
    import comfy.patcher_extension as pe

    options = DGOptions(weight, start_percent, end_percent, schedule, boost, first_evaluation_only,
                        class_label).validate()
    options.check_labels(discriminator)
    check = getattr(discriminator, "check_compatible", None)
    if callable(check):
        check(model.model)
    patch = GuidancePatch(discriminator, options)
    m = model.clone()
    m.set_model_sampler_post_cfg_function(patch)
    m.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, patch.key, patch.sampler_wrapper)
    m.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, patch.key, patch.offload)
    if patch.shared is not None:
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, patch.key, patch.shared.calc_cond_batch)
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, patch.key, patch.shared.apply_model)
    return m
