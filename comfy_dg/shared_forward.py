"""Features from the sampler's own forward pass: a features head's guidance for the price of one backward pass.

A features head trained under the negative prompt the user samples with (FeatureHeadDiscriminator.conditioning)
reads the UNet's middle-block output of x under that prompt, which CFG computes anyway for its uncond half.
So, at each guided evaluation:
  - calc_cond_batch's CFG call is split into a cond and an uncond forward (together they cost what the batched
    one did), so that the backward pass runs over the uncond rows only;
  - the uncond forward runs with autograd on, from x: the features are caught where the first output block
    receives them (output_block_patch), and both that block's inputs are detached there, so the decoder half
    records nothing;
  - log r = head(features, σ) and ∇ₓ log r (one backward pass through the encoder half) are handed to the
    post-CFG hook of the same evaluation, which applies the correction as usual.
Whenever the uncond half is not exactly what the head was trained under (cfg 1, another negative prompt, areas,
masks, ControlNet, hooks, other patches inside the UNet), nothing is changed here and the guide takes its own
pass under the stored conditioning instead (taps.UNetMiddle.features): the result is the same, only slower.
"""
import torch

from .tensors import autograd_weights, frozen, gradient_dtype

# Keys of a processed cond that change the uncond forward beyond its prompt.
_ALTERING_KEYS = ("area", "mask", "control", "hooks", "gligen", "timestep_start", "timestep_end", "default")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same prompt tensor, to within half-precision rounding (different prompts differ by far more)."""
    a = a.detach().to(device=b.device, dtype=b.dtype)
    return a.shape[-b.ndim:] == b.shape and torch.allclose(a, b.expand_as(a), rtol=1e-3, atol=1e-3)


def _normal(v):
    return v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v


class SharedForward:
    """Wrappers (CALC_COND_BATCH and APPLY_MODEL) that take a features head's log r and ∇ₓ log r from the
    sampler's uncond forward. `guided(base_model, model_options, σ)` says, without side effects, whether the
    guide will correct this evaluation; `prepare(device)` puts the head there; `labels(n, device)` gives its
    class labels (or None)."""

    def __init__(self, head, guided, prepare, labels, logit_max: float):
        self.head, self.guided, self.prepare, self.labels = head, guided, prepare, labels
        self.logit_max = logit_max
        self.pending = None     # the latent shape, while a guided evaluation's uncond forward runs
        self.result = None      # (σ, log r, ∇ₓ log r) for this evaluation's post-CFG hook

    def matches(self, uncond) -> bool:
        """Is this uncond exactly the one conditioning the head was trained under?"""
        if not uncond or len(uncond) != 1 or any(k in uncond[0] for k in _ALTERING_KEYS):
            return False
        model_conds = uncond[0].get("model_conds", {})
        if not set(model_conds) <= {"c_crossattn", "y"} or "c_crossattn" not in model_conds:
            return False
        context, y = self.head.conditioning
        if not _same(model_conds["c_crossattn"].cond, context):
            return False
        if y is None:
            return "y" not in model_conds
        return "y" in model_conds and _same(model_conds["y"].cond, y)

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        if len(conds) != 2:         # not a CFG evaluation (e.g. another patch's own call): leave it alone
            return executor(model, conds, x_in, timestep, model_options)
        self.result = None
        if conds[1] is None or not self.matches(conds[1]) or not self.guided(model, model_options, timestep):
            return executor(model, conds, x_in, timestep, model_options)
        out_cond = executor(model, [conds[0], None], x_in, timestep, model_options)[0]
        self.pending = tuple(x_in.shape)
        try:
            out_uncond = executor(model, [None, conds[1]], x_in, timestep, model_options)[1]
        finally:
            self.pending = None
        return [out_cond, out_uncond]

    def _plain_unet_call(self, x, c_concat, control, transformer_options) -> bool:
        patches = transformer_options.get("patches", {})
        return (self.pending == tuple(x.shape) and transformer_options.get("cond_or_uncond") == [1]
                and c_concat is None and control is None and not transformer_options.get("patches_replace")
                and set(patches) <= {"output_block_patch"})

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        if not self._plain_unet_call(x, c_concat, control, transformer_options):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        self.pending = None
        caught = {}

        def catch(h, hsp, options):
            if options.get("block") == ("output", 0):
                caught["h"] = h
            return h.detach(), hsp.detach()     # the decoder half needs no graph

        options = dict(transformer_options)
        patches = dict(options.get("patches", {}))
        patches["output_block_patch"] = [catch] + list(patches.get("output_block_patch", []))
        options["patches"] = patches
        base_model = executor.class_obj
        self.prepare(x.device)
        dtype = gradient_dtype(x)
        with torch.inference_mode(False), torch.enable_grad():
            autograd_weights(base_model.diffusion_model)
            xg = x.detach().clone().to(dtype).requires_grad_(True)
            # σ and the prompt tensors were made under inference mode, which autograd cannot save: use copies.
            t, c_crossattn = _normal(t), _normal(c_crossattn)
            kwargs = {k: _normal(v) for k, v in kwargs.items()}
            with frozen(base_model.diffusion_model):
                out = executor(xg, t, c_concat, c_crossattn, control, options, **kwargs)
            if "h" in caught:
                sigma = t.detach().clone().to(dtype)
                logit = self.head.head(caught.pop("h"), sigma, self.labels(len(x), x.device)).reshape(-1)
                (grad,) = torch.autograd.grad(logit.clamp(-self.logit_max, self.logit_max).sum(), xg)
                self.result = (sigma, logit.detach(), grad.detach())
        return out.detach().to(x.dtype)

    def take(self, x: torch.Tensor, sigma: torch.Tensor):
        """This evaluation's (log r, ∇ₓ log r) for all rows of x, or None (then the guide takes its own pass)."""
        result, self.result = self.result, None
        if result is None:
            return None
        s, logit, grad = result
        if grad.shape != x.shape or s.shape != sigma.shape or not torch.equal(s, sigma.to(s)):
            return None
        return logit, grad
