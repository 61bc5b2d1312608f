"""Frozen features of the user's own diffusion network, with a graph back to its input.

A tap runs the diffusion model's forward up to a chosen block and stops there (the rest of the network is
never computed). By default the prompt plays no part: cross-attention sees one all-zero token and pooled/class
vectors are zero, so the features are noise-conditioned and prompt-independent. A UNet head can instead be
trained under one fixed conditioning (the negative prompt the user samples with); the guide then takes the
features from the sampler's own forward pass of that prompt (comfy_dg.shared_forward) and needs no extra pass.

Each tap returns (B, C, H', W') features: a UNet block's output as it is; a transformer's image tokens
laid back out on the latent's patch grid.
"""
import math

import torch

from ..tensors import autograd_weights


class _Stop(Exception):
    pass


def _compute_dtype(base_model):
    return base_model.manual_cast_dtype or base_model.get_dtype()


class UNetMiddle:
    """SD1.x / SD2 / SDXL UNets (comfy.ldm...openaimodel.UNetModel): the middle block's output."""

    name = "unet_middle"

    @staticmethod
    def supports(diffusion_model) -> bool:
        return type(diffusion_model).__name__ == "UNetModel" and hasattr(diffusion_model, "middle_block") \
            and len(diffusion_model.middle_block) > 0

    @staticmethod
    def channels(base_model) -> int:
        dm = base_model.diffusion_model
        last = dm.middle_block[-1]
        return int(getattr(last, "out_channels", None) or dm.model_channels * dm.channel_mult[-1])

    @staticmethod
    def features(base_model, x_in: torch.Tensor, sigma: torch.Tensor, conditioning=None) -> torch.Tensor:
        """`conditioning` (context (T, C), y (D,) or None), as the network's forward gets them for one sample:
        the prompt the features are taken under. None: the prompt-independent all-zero token."""
        dm = base_model.diffusion_model
        autograd_weights(dm)
        cfg = base_model.model_config.unet_config
        dtype = _compute_dtype(base_model)
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
        return _run_until(dm, dm.middle_block[-1],
                          lambda: dm(x_in.to(dtype), t, context=context, transformer_options={}, **kwargs))


def _saved_activation_copies():
    """Autograd saves the activations it needs for the backward pass by reference; Flux's blocks then update
    some of them in place (`img += ...` after img_norm1(img) has saved img), which makes the backward pass fail.
    Under this context autograd saves a copy of each activation on the graph instead (the originals are freed as
    usual, so memory stays as it was; weights and other tensors off the graph are not copied, and for them the
    usual in-place check is kept)."""
    def pack(t):
        if t.requires_grad and not t.is_leaf:
            return t.detach().clone(), None
        return t, (None if t.is_inference() else t._version)

    def unpack(packed):
        t, version = packed
        if version is not None and t._version != version:
            raise RuntimeError("comfy-dg: a tensor the feature tap's backward pass needs was modified in place")
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _run_until(dm, block, call):
    """Run call() (the network's forward) until `block` has produced its output; return that output. The
    forward is stopped there by an exception from a forward hook, so no later block is computed."""
    captured = {}

    def grab(_module, _inputs, output):
        captured["out"] = output
        raise _Stop

    handle = block.register_forward_hook(grab)
    try:
        call()
    except _Stop:
        pass
    finally:
        handle.remove()
    if "out" not in captured:
        raise RuntimeError(f"comfy-dg: the feature tap's block of the {type(dm).__name__} did not run "
                           "(a patch may have replaced it)")
    return captured["out"]


def _prompt_independent_only(conditioning, family):
    if conditioning is not None:
        raise ValueError(f"comfy-dg: features under a prompt are supported for UNets (SD1.x, SD2, SDXL); the {family} "
                         "tap takes prompt-independent features only")


def _token_grid(tokens: torch.Tensor, x_in: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Image tokens (B, h·w, C) on the patch grid of x_in (the model pads the latent up to the patch size,
    then patchifies row-major) -> (B, C, h, w)."""
    h = math.ceil(x_in.shape[-2] / patch_size)
    w = math.ceil(x_in.shape[-1] / patch_size)
    b, _, c = tokens.shape
    return tokens[:, :h * w].reshape(b, h, w, c).permute(0, 3, 1, 2)


class _TokenTap:
    """A transformer's image tokens, laid back on the latent's patch grid: as many channels as its width."""

    @staticmethod
    def channels(base_model) -> int:
        return int(base_model.diffusion_model.hidden_size)


class FluxDouble(_TokenTap):
    """Flux (comfy.ldm.flux.model.Flux: Flux.1 dev/schnell, and Flux.2, which shares the class): the image
    tokens output by the last double-stream block, the network's middle (Flux.1: 19 double + 38 single)."""

    name = "flux_double"
    GUIDANCE = 3.5      # guidance-distilled models (guidance_embed) always saw a guidance value: ComfyUI's default

    @staticmethod
    def supports(diffusion_model) -> bool:
        dm = diffusion_model
        return type(dm).__name__ == "Flux" and hasattr(dm, "params") and hasattr(dm, "img_in") \
            and len(getattr(dm, "double_blocks", ())) > 0

    @staticmethod
    def features(base_model, x_in: torch.Tensor, sigma: torch.Tensor, conditioning=None) -> torch.Tensor:
        _prompt_independent_only(conditioning, "Flux")
        dm = base_model.diffusion_model
        autograd_weights(dm)
        params = dm.params
        dtype = _compute_dtype(base_model)
        b, device = x_in.shape[0], x_in.device
        # model_base.Flux adds no timestep processing: the network gets model_sampling.timestep(σ) (= σ).
        t = base_model.model_sampling.timestep(sigma).float()
        context = torch.zeros(b, 1, params.context_in_dim, device=device, dtype=dtype)
        y = torch.zeros(b, params.vec_in_dim, device=device, dtype=dtype) if dm.vector_in is not None else None
        guidance = torch.full((b,), FluxDouble.GUIDANCE, device=device, dtype=dtype) \
            if params.guidance_embed else None
        with _saved_activation_copies():
            img, _txt = _run_until(dm, dm.double_blocks[-1], lambda: dm(
                x_in.to(dtype), t, context=context, y=y, guidance=guidance, transformer_options={}))
        if img.dtype == torch.float16:      # as the network does after its double blocks
            img = torch.nan_to_num(img, nan=0.0, posinf=65504, neginf=-65504)
        return _token_grid(img, x_in, dm.patch_size)


class MMDiTMiddle(_TokenTap):
    """SD3 / SD3.5 (comfy.ldm.modules.diffusionmodules.mmdit.MMDiT): the image tokens output by the middle
    joint block, joint_blocks[depth // 2]."""

    name = "mmdit_middle"

    @staticmethod
    def supports(diffusion_model) -> bool:
        dm = diffusion_model
        return type(dm).__name__ in ("MMDiT", "OpenAISignatureMMDITWrapper") \
            and type(dm).__module__.endswith("diffusionmodules.mmdit") and hasattr(dm, "x_embedder") \
            and len(getattr(dm, "joint_blocks", ())) > 0

    @staticmethod
    def features(base_model, x_in: torch.Tensor, sigma: torch.Tensor, conditioning=None) -> torch.Tensor:
        _prompt_independent_only(conditioning, "SD3")
        dm = base_model.diffusion_model
        autograd_weights(dm)
        dtype = _compute_dtype(base_model)
        b, device = x_in.shape[0], x_in.device
        t = base_model.model_sampling.timestep(sigma).float()
        embedder = dm.context_embedder
        context_dim = getattr(embedder, "in_features", None) or dm.hidden_size
        context = torch.zeros(b, 1, context_dim, device=device, dtype=dtype)
        y = None
        if dm.y_embedder is not None:
            y = torch.zeros(b, dm.y_embedder.mlp[0].in_features, device=device, dtype=dtype)
        block = dm.joint_blocks[len(dm.joint_blocks) // 2]
        with _saved_activation_copies():      # no in-place updates in ComfyUI 0.3.75's MMDiT; cheap insurance
            _context, x = _run_until(dm, block, lambda: dm(
                x_in.to(dtype), t, context=context, y=y, transformer_options={}))
        return _token_grid(x, x_in, dm.patch_size)


TAPS = {t.name: t for t in (UNetMiddle, FluxDouble, MMDiTMiddle)}


def find_tap(diffusion_model):
    return next((t for t in TAPS.values() if t.supports(diffusion_model)), None)
