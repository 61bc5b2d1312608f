"""What the taps share: running a network's forward up to one block, and laying tokens back on the latent grid."""
import math

import torch


class _Stop(Exception):
    pass


def compute_dtype(base_model):
    return base_model.manual_cast_dtype or base_model.get_dtype()


def run_until(dm, block, call):
    """Run call() (the network's forward) until `block` has produced its output; return that output. The forward
    is stopped there by an exception from a forward hook, so no later block is computed."""
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
