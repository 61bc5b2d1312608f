"""What the taps share: running a network's forward up to one block (on its differentiable code path), what a
backward pass through the network needs of ComfyUI, and laying tokens back on the latent grid.

Found by looking at ComfyUI's own objects, never at its version:
- `comfy.model_management.in_training`, where it exists: some networks (Flux's RoPE, ...) run comfy_kitchen kernels
  without a backward pass unless it is set, as ComfyUI's own training nodes do. It is process-wide, so the pack sets
  it only around a tap's own pass and puts the old value back on any exit. The sampler's forward, which the UNet
  fast path differentiates, runs as the sampler runs it (no UNet code reads the flag).
- A dynamic-VRAM patcher (`is_dynamic()`: comfy-aimdo streams each layer's weights onto the GPU when the layer runs,
  into buffers later layers reuse): a backward pass would need weights that are gone by then.
"""
import contextlib
import math

import torch


class _Stop(Exception):
    pass


def compute_dtype(base_model):
    return base_model.manual_cast_dtype or base_model.get_dtype()


@contextlib.contextmanager
def differentiable_forward():
    """ComfyUI's training flag on for the duration only, where this ComfyUI has one."""
    import comfy.model_management as mm
    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


def is_dynamic(model_patcher) -> bool:
    """Whether ComfyUI streams this model's weights at op time (ModelPatcherDynamic; ComfyUI builds the plain
    patcher on the CPU and under --disable-dynamic-vram)."""
    check = getattr(model_patcher, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def refuse_dynamic_vram(model_patcher, what: str):
    if is_dynamic(model_patcher):
        from ..errors import UnsupportedModel
        raise UnsupportedModel(
            f"comfy-dg: {what} takes a gradient through the diffusion network, but ComfyUI loaded this model with "
            "dynamic VRAM (weights streamed onto the GPU layer by layer, which a backward pass cannot use). "
            "Restart ComfyUI with --disable-dynamic-vram, or use a standalone discriminator (no gradient through "
            "the network).")


def run_until(dm, block, call):
    """Run call() (the network's forward, on its differentiable code path) until `block` has produced its output;
    return that output. The forward is stopped there by an exception from a forward hook, so no later block is
    computed."""
    captured = {}

    def grab(_module, _inputs, output):
        captured["out"] = output
        raise _Stop

    handle = block.register_forward_hook(grab)
    try:
        with differentiable_forward():
            call()
    except _Stop:
        pass
    finally:
        handle.remove()
    if "out" not in captured:
        from ..errors import UnsupportedModel
        raise UnsupportedModel(f"comfy-dg: the feature tap's block of the {type(dm).__name__} did not run (a patch "
                               "may have replaced it); remove that patch or use a standalone discriminator")
    return captured["out"]


def saved_activation_copies():
    """Autograd saves the activations it needs for the backward pass by reference; some networks (Flux) then update
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


def token_grid(tokens: torch.Tensor, x_in: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Image tokens (B, h·w, C) on the patch grid of x_in (the model pads the latent up to the patch size, then
    patchifies row-major) -> (B, C, h, w)."""
    h = math.ceil(x_in.shape[-2] / patch_size)
    w = math.ceil(x_in.shape[-1] / patch_size)
    b, _, c = tokens.shape
    return tokens[:, :h * w].reshape(b, h, w, c).permute(0, 3, 1, 2)


class TokenTap:
    """A transformer's image tokens, laid back on the latent's patch grid: as many channels as its width. Its
    features are prompt-independent (a zero text token and pooled vector)."""

    install_fast_path = None

    @staticmethod
    def channels(base_model) -> int:
        return int(base_model.diffusion_model.hidden_size)

    @staticmethod
    def prompt_dims(base_model):
        return None
