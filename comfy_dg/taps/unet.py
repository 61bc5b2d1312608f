"""SD1.x / SD2 / SDXL UNets (comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel): the middle block's output,
and the fast path that takes it from the sampler's own forward pass.

By default the prompt plays no part in the features (cross-attention sees one all-zero token, pooled/class vectors
are zero). A head can instead be trained under one fixed conditioning, the negative prompt the user samples with
(FeatureHeadDiscriminator.conditioning). CFG computes the UNet's forward under that prompt anyway for its uncond
half, so at each guided evaluation the fast path
  - splits calc_cond_batch's CFG call into a cond and an uncond forward (together they cost what the batched one
    did), so that the backward pass runs over the uncond rows only;
  - runs the uncond forward with autograd on, from x: the features are caught where the first output block
    receives them (output_block_patch), and both that block's inputs are detached there, so the decoder half
    records nothing;
  - computes every waiting head's log r and ∇ₓ log r (one backward pass through the encoder half each) and hands
    them to those heads' guidance patches, whose post-CFG hooks apply the corrections as usual.
Whenever the uncond half is not exactly what a head was trained under (cfg 1, another negative prompt, areas, masks,
ControlNet, hooks, other patches inside the UNet), nothing is changed here and that head's patch takes its own pass
under the stored conditioning instead (UNetMiddle.features): the same result, only slower.
"""
import torch

from .. import dg, identity
from .common import compute_dtype, run_until

FAST_PATH_KEY = "comfy_dg_unet_fast_path"
# Keys of a processed cond that change the uncond forward beyond its prompt.
_ALTERING_KEYS = ("area", "mask", "control", "hooks", "gligen", "timestep_start", "timestep_end", "default")
# The first output block receives the middle block's output (after ControlNet's middle residual).
_FEATURES_AT = ("output", 0)


class UNetMiddle:
    name = "unet_middle"
    network = "unet"

    @staticmethod
    def supports(diffusion_model) -> bool:
        return identity.network(diffusion_model) == UNetMiddle.network \
            and len(getattr(diffusion_model, "middle_block", ())) > 0

    @staticmethod
    def channels(base_model) -> int:
        dm = base_model.diffusion_model
        last = dm.middle_block[-1]
        return int(getattr(last, "out_channels", None) or dm.model_channels * dm.channel_mult[-1])

    @staticmethod
    def prompt_dims(base_model):
        unet = base_model.model_config.unet_config
        return int(unet.get("context_dim") or 0), int(unet.get("adm_in_channels") or 0)

    @staticmethod
    def features(base_model, x_in: torch.Tensor, sigma: torch.Tensor, conditioning=None) -> torch.Tensor:
        """`conditioning` (context (T, C), y (D,) or None), as the network's forward gets them for one sample: the
        prompt the features are taken under. None: the prompt-independent all-zero token."""
        dm = base_model.diffusion_model
        cfg = base_model.model_config.unet_config
        dtype = compute_dtype(base_model)
        b, device = x_in.shape[0], x_in.device
        t = base_model.model_sampling.timestep(sigma).float()
        kwargs = {}
        if conditioning is not None:
            context, y = conditioning
            context = context.to(device=device, dtype=dtype).expand(b, *context.shape)
            if y is not None:
                kwargs["y"] = y.to(device=device, dtype=dtype).expand(b, *y.shape)
        else:
            context = torch.zeros(b, 1, cfg.get("context_dim") or 1, device=device, dtype=dtype)
        if getattr(dm, "num_classes", None) is not None and "y" not in kwargs:
            kwargs["y"] = torch.zeros(b, cfg["adm_in_channels"], device=device, dtype=dtype) \
                if dm.num_classes == "sequential" else torch.zeros(b, device=device, dtype=torch.long)
        return run_until(dm, dm.middle_block[-1],
                         lambda: dm(x_in.to(dtype), t, context=context, transformer_options={}, **kwargs))

    @staticmethod
    def install_fast_path(model_patcher):
        """One fast path per model serves every guidance patch on it (chained Discriminator Guidance nodes)."""
        import comfy.patcher_extension as pe
        if model_patcher.get_wrappers(pe.WrappersMP.CALC_COND_BATCH, FAST_PATH_KEY):
            return
        fast = FastPath()
        model_patcher.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, FAST_PATH_KEY, fast.calc_cond_batch)
        model_patcher.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, FAST_PATH_KEY, fast.apply_model)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same prompt tensor, to within half-precision rounding (different prompts differ by far more)."""
    a = a.detach().to(device=b.device, dtype=b.dtype)
    return a.shape[-b.ndim:] == b.shape and torch.allclose(a, b.expand_as(a), rtol=1e-3, atol=1e-3)


def matches(uncond, conditioning) -> bool:
    """Is this processed uncond exactly the conditioning (context, y) a head was trained under?"""
    if not uncond or len(uncond) != 1 or any(k in uncond[0] for k in _ALTERING_KEYS):
        return False
    model_conds = uncond[0].get("model_conds", {})
    if not set(model_conds) <= {"c_crossattn", "y"} or "c_crossattn" not in model_conds:
        return False
    context, y = conditioning
    if not _same(model_conds["c_crossattn"].cond, context):
        return False
    if y is None:
        return "y" not in model_conds
    return "y" in model_conds and _same(model_conds["y"].cond, y)


def _normal(v):
    return v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v


class FastPath:
    """The CALC_COND_BATCH and APPLY_MODEL wrappers. The guidance patches it serves are found in the evaluation's
    own post-CFG list: objects with `fast_head` (a head trained under a prompt), `will_guide(base_model,
    model_options, σ)`, `labels(n, device)` and a `fast_result` slot for (σ, log r, ∇ₓ log r)."""

    def __init__(self):
        self.pending = None     # (latent shape, patches) while a guided evaluation's uncond forward runs

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        patches = [p for p in model_options.get("sampler_post_cfg_function", ()) if getattr(p, "fast_head", None)]
        for p in patches:
            p.fast_result = None
        if len(conds) != 2 or conds[1] is None:     # not a CFG evaluation (e.g. another patch's own call)
            return executor(model, conds, x_in, timestep, model_options)
        patches = [p for p in patches if matches(conds[1], p.fast_head.conditioning)
                   and p.will_guide(model, model_options, timestep)]
        if not patches:
            return executor(model, conds, x_in, timestep, model_options)
        out_cond = executor(model, [conds[0], None], x_in, timestep, model_options)[0]
        self.pending = (tuple(x_in.shape), patches)
        try:
            out_uncond = executor(model, [None, conds[1]], x_in, timestep, model_options)[1]
        finally:
            self.pending = None
        return [out_cond, out_uncond]

    def _plain_unet_call(self, x, c_concat, control, transformer_options) -> bool:
        patches = transformer_options.get("patches", {})
        return (self.pending is not None and self.pending[0] == tuple(x.shape)
                and transformer_options.get("cond_or_uncond") == [1] and c_concat is None and control is None
                and not transformer_options.get("patches_replace") and set(patches) <= {"output_block_patch"})

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        if not self._plain_unet_call(x, c_concat, control, transformer_options):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        patches = self.pending[1]
        self.pending = None
        caught = {}

        def catch(h, hsp, options):
            if options.get("block") == _FEATURES_AT:
                caught["h"] = h
            return h.detach(), hsp.detach()     # the decoder half needs no graph

        options = dict(transformer_options)
        extra = dict(options.get("patches", {}))
        extra["output_block_patch"] = [catch] + list(extra.get("output_block_patch", []))
        options["patches"] = extra
        with torch.inference_mode(False), torch.enable_grad():
            xg = dg.leaf(x)
            # σ and the prompt tensors were made under inference mode, which autograd cannot save: use copies.
            t, c_crossattn = _normal(t), _normal(c_crossattn)
            kwargs = {k: _normal(v) for k, v in kwargs.items()}
            out = executor(xg, t, c_concat, c_crossattn, control, options, **kwargs)
            if "h" in caught:
                h, sigma = caught.pop("h"), t.detach().clone().to(xg.dtype)
                for i, p in enumerate(patches):
                    logit = p.fast_head.head(h, sigma, p.labels(len(x), x.device))
                    # One backward pass per head; the graph is kept for the next one.
                    log_r, grad = dg.log_ratio_and_grad(logit, xg, retain_graph=i + 1 < len(patches))
                    p.fast_result = (sigma, log_r, grad)
        return out.detach().to(x.dtype)
