"""guide(): discriminator guidance as a ComfyUI model patch. This module gates and dispatches; the math is dg.py's.

The correction runs in ComfyUI's post-CFG hook list (so it chains with other patches and runs for KSampler and
every SamplerCustomAdvanced guider, at any cfg), once per model evaluation, per sample. A SAMPLER_SAMPLE wrapper
does the per-run work once: the σ window, which evaluation of a step is which, the network and discriminator made
ready for autograd; its state lives in the run's transformer_options, so nothing leaks between runs.
"""
import contextlib
import logging
import math
import uuid

import torch

from . import dg, parameterization
from .errors import OptionError
from .options import GUIDANCE, check
from .steps import DECLARE_THEIR_EVALUATIONS, StepTracker, sampler_name
from .taps import find_tap
from .taps.common import refuse_dynamic_vram
from .tensors import autograd_weights, frozen

log = logging.getLogger("comfy_dg")

RUNS_KEY = "comfy_dg_runs"


def runs_of(extra_args) -> list:
    """The Discriminator Guidance runs (Run) of one sampling run, one per guidance patch on the model (for the
    pack's samplers, which read and set their per-evaluation fields)."""
    return list(extra_args.get("model_options", {}).get("transformer_options", {}).get(RUNS_KEY, {}).values())


class Run:
    """One sampling run of one guidance patch: what is fixed for the run, and what it learns as it goes."""

    def __init__(self, patch, base_model, sigmas=None, sampler=None):
        opts = patch.options
        self.model_sampling = base_model.model_sampling
        parameterization.check_supported(self.model_sampling)
        self.window = parameterization.window(self.model_sampling, opts["start_percent"], opts["end_percent"])
        # Which evaluation of a step is which matters only when the two weights differ.
        name = sampler_name(sampler) if sampler is not None else None
        self.tracker = StepTracker(name, sigmas) if name is not None and name not in DECLARE_THEIR_EVALUATIONS \
            and opts["weight"] != opts["intermediate_weight"] else None
        self.first_evaluation = None  # True/False: set before each model call by a sampler that declares them
        self.boost = 1.0            # w multiplier where log r < 0, set per evaluation by sampling.sample_dg_heun_boosted
        self.log_r = None           # (B,) log r at the last evaluation, +inf where it was not taken (read by it too)
        self.warned = False

    def is_first(self, consume: bool) -> bool:
        """Whether this evaluation is its step's first (consume: count it, as the hook does once per evaluation)."""
        if self.first_evaluation is not None:
            return self.first_evaluation
        if self.tracker is None:
            return True
        return self.tracker.on_evaluation() if consume else self.tracker.peek()

    def weight(self, patch) -> float:
        """w for this evaluation (consumes it): w on a step's first evaluation, w₂ on its intermediate ones."""
        return patch.options["weight" if self.is_first(consume=True) else "intermediate_weight"]


class GuidancePatch:
    """The post-CFG hook and its wrappers. One per guide() call."""

    def __init__(self, discriminator, options: dict):
        self.discriminator = discriminator
        self.options = options
        self.key = f"comfy_dg_{uuid.uuid4().hex[:8]}"
        tap = getattr(discriminator, "tap_class", None)
        # A features head trained under the user's negative prompt can read the sampler's own forward pass.
        self.fast_head = discriminator if tap is not None and tap.install_fast_path is not None \
            and getattr(discriminator, "conditioning", None) is not None else None
        self.fast_result = None     # (σ, log r, ∇ₓ log r) handed over by the tap's fast path for this evaluation

    # --- per run ------------------------------------------------------------------------------------------
    def run(self, model_options):
        return model_options.get("transformer_options", {}).get(RUNS_KEY, {}).get(self.key)

    @contextlib.contextmanager
    def ready(self, base_model, device):
        """The discriminator on the model's device, its weights and (features) the network's usable by autograd,
        the network's weights frozen so that autograd records nothing it does not need."""
        d = self.discriminator
        if isinstance(d, torch.nn.Module):
            with torch.inference_mode(False):   # moved tensors must be usable by autograd
                d.to(device)
                autograd_weights(d)
        if getattr(d, "tap_class", None) is None:
            yield
            return
        autograd_weights(base_model.diffusion_model)
        with frozen(base_model.diffusion_model):
            yield

    def sampler_wrapper(self, executor, guider, sigmas, extra_args, callback, *rest, **kwargs):
        base_model = guider.model_patcher.model
        run = Run(self, base_model, sigmas, executor.class_obj)
        to = extra_args["model_options"].setdefault("transformer_options", {})
        to[RUNS_KEY] = {**to.get(RUNS_KEY, {}), self.key: run}
        if run.tracker is not None:
            def step_callback(i, denoised, x, total_steps):
                run.tracker.on_callback(i)
                if callback is not None:
                    return callback(i, denoised, x, total_steps)
        else:
            step_callback = callback
        with self.ready(base_model, guider.model_patcher.load_device):
            out = executor(guider, sigmas, extra_args, step_callback, *rest, **kwargs)
        if run.tracker is not None:
            run.tracker.finish()
        return out

    def offload(self, model_patcher):
        if isinstance(self.discriminator, torch.nn.Module):
            with torch.inference_mode(False):
                self.discriminator.to(model_patcher.offload_device)

    # --- per evaluation ----------------------------------------------------------------------------------
    def will_guide(self, base_model, model_options, sigma) -> bool:
        """Whether the hook will correct this evaluation (no side effects: the fast path asks first)."""
        run = self.run(model_options)
        if run is None:
            return False
        w = self.options["weight" if run.is_first(consume=False) else "intermediate_weight"]
        return w != 0.0 and bool(run.window.contains(sigma.reshape(-1)).any())

    def labels(self, n, device):
        label = self.options["class_label"]
        return None if label < 0 else torch.full((n,), label, device=device)

    def _own_pass(self, base_model, x, sigma):
        """(log r, ∇ₓ log r) from the discriminator's own forward pass."""
        fn = bound(self.discriminator, base_model, self.labels(len(x), x.device))
        ms = base_model.model_sampling
        with torch.inference_mode(False), torch.enable_grad():
            xg = dg.leaf(x)
            sg = sigma.detach().clone().to(device=x.device, dtype=xg.dtype)
            return dg.log_ratio_and_grad(fn(ms.calculate_input(sg, xg), sg), xg)

    def _take_fast_result(self, x, sigma):
        result, self.fast_result = self.fast_result, None
        if result is None:
            return None
        s, log_r, grad = result
        if grad.shape != x.shape or s.shape != sigma.shape or not torch.equal(s, sigma.to(s)):
            return None
        return log_r, grad

    def __call__(self, args):
        denoised, x, base_model = args["denoised"], args["input"], args["model"]
        run = self.run(args["model_options"])
        if run is None:     # called outside a sampler run (no SAMPLER_SAMPLE wrapper): one evaluation's run
            run = Run(self, base_model)
            with self.ready(base_model, x.device):
                return self._guide(run, denoised, x, args["sigma"], base_model)
        return self._guide(run, denoised, x, args["sigma"], base_model)

    def _guide(self, run, denoised, x, sigma, base_model):
        w = run.weight(self)
        sigma = sigma.reshape(-1)
        if sigma.numel() == 1 and x.shape[0] > 1:
            sigma = sigma.expand(x.shape[0])
        run.log_r = torch.full((x.shape[0],), math.inf, device=x.device)
        fast = self._take_fast_result(x, sigma)
        if w == 0.0:
            return denoised
        active = run.window.contains(sigma)
        if not bool(active.any()):
            return denoised
        rows = active.nonzero().reshape(-1)
        if fast is not None:
            log_r, grad = fast[0][rows], fast[1][rows]
        else:
            log_r, grad = self._own_pass(base_model, x[rows], sigma[rows])
        run.log_r[rows] = log_r.to(run.log_r)

        s = sigma[rows].to(grad.dtype)
        a = parameterization.alpha(run.model_sampling, s)
        w_s = dg.scheduled(w, self.options["schedule"], dg.window_position(s, run.window.hi, run.window.lo))
        w_s = dg.boosted(w_s, log_r, self.options["boost"] * run.boost)
        delta = dg.correction(grad, w_s, s, a)
        ok = dg.usable(delta, log_r, s, a)
        if not bool(ok.all()):
            if not run.warned:
                log.warning("comfy-dg: the discriminator gave a non-finite or absurdly large (> %g·(1 + σ/α)) log r "
                            "or gradient for %d of %d samples at σ=%s; those samples get no correction.",
                            dg.MAX_SHIFT, int((~ok).sum()), len(ok), [round(float(v), 4) for v in s[~ok]])
                run.warned = True
            delta = torch.where(dg.per_sample(ok, delta), delta, torch.zeros_like(delta))
        out = denoised.clone()
        out[rows] = (denoised[rows].to(delta.dtype) + delta).to(denoised.dtype)
        return out


def bound(discriminator, base_model, labels=None):
    """callable(x_in, σ) -> logit: the pack's discriminators bind to the model (the features one needs its network)
    and to the class labels; any other module is used as it is."""
    bind = getattr(discriminator, "bind", None)
    return bind(base_model, labels) if callable(bind) else discriminator


def check_discriminator(base_model, discriminator, class_label, class_name=""):
    """Refuse a discriminator trained for another kind of model, or a class it does not know; the class label to
    use (class_label, or the label of class_name: the name stored in the file)."""
    info = getattr(discriminator, "info", None)
    class_name = (class_name or "").strip()
    if class_name:
        if class_label >= 0:
            raise OptionError("comfy-dg: give the class by class_label or by class_name, not both; set class_label "
                              "to -1 or clear class_name.")
        if not callable(getattr(info, "class_index", None)):
            raise OptionError("comfy-dg: a class name needs one of the pack's discriminators (their files store "
                              "the names); give class_label instead.")
        class_label = info.class_index(class_name)
    classes = getattr(info, "num_classes", 0)
    if class_label >= 0 and not classes:
        raise OptionError(f"comfy-dg: class_label {class_label} was given but the discriminator is not "
                          "class-conditional; set class_label to -1.")
    if class_label >= classes > 0:
        known = info.describe_classes() if callable(getattr(info, "describe_classes", None)) \
            else f"classes 0..{classes - 1}"
        raise OptionError(f"comfy-dg: class_label {class_label} is out of range: the discriminator knows {known}.")
    fits = getattr(discriminator, "check_compatible", None)
    if callable(fits):
        fits(base_model)
    return class_label


def guide(model, discriminator, weight: float = GUIDANCE["weight"].default,
          start_percent: float = GUIDANCE["start_percent"].default,
          end_percent: float = GUIDANCE["end_percent"].default,
          schedule: str = GUIDANCE["schedule"].default,
          boost: float = GUIDANCE["boost"].default,
          intermediate_weight: float = GUIDANCE["intermediate_weight"].default,
          class_label: int = GUIDANCE["class_label"].default,
          class_name: str = GUIDANCE["class_name"].default):
    """A clone of the ModelPatcher `model` whose denoiser is guided by `discriminator`:
    D' = D + w(σ)·σ²/α·∇ₓ log r, with w = `weight` on each step's first model evaluation and
    `intermediate_weight` on its intermediate ones (Heun's correction, ...; the official code's w₂, default 0).

    `discriminator` is one of the pack's discriminators (see load_discriminator) or any torch.nn.Module called
    as discriminator(x_in, sigma) -> logit log(d/(1−d)) of shape (B,), where x_in =
    model_sampling.calculate_input(sigma, x) and sigma has shape (B,). For a class-conditional discriminator,
    class_label picks the class to guide toward (-1: unconditional), or class_name picks it by the name stored in
    the file.
    """
    import comfy.patcher_extension as pe

    options = check(GUIDANCE, {"weight": weight, "start_percent": start_percent, "end_percent": end_percent,
                               "schedule": schedule, "boost": boost, "intermediate_weight": intermediate_weight,
                               "class_label": class_label, "class_name": class_name})
    if start_percent > end_percent:
        raise OptionError(f"comfy-dg: start_percent ({start_percent}) is after end_percent ({end_percent}); the "
                          "window runs from start_percent (noisy) to end_percent (clean): swap them.")
    parameterization.check_supported(model.model.model_sampling)
    options["class_label"] = check_discriminator(model.model, discriminator, class_label, class_name)
    if getattr(discriminator, "tap_class", None) is not None:   # a features head: a gradient through the network
        refuse_dynamic_vram(model, "Discriminator Guidance with a features discriminator")
    patch = GuidancePatch(discriminator, options)
    m = model.clone()
    m.set_model_sampler_post_cfg_function(patch)
    m.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, patch.key, patch.sampler_wrapper)
    m.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, patch.key, patch.offload)
    if patch.fast_head is not None:
        patch.fast_head.tap_class.install_fast_path(m)
    return m


__all__ = ["guide", "GuidancePatch", "RUNS_KEY", "find_tap"]
