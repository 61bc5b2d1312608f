"""Frozen features of the user's own diffusion network, with a graph back to its input.

A tap runs the diffusion model's forward up to a chosen block and stops there (the rest of the network is
never computed). The prompt plays no part: cross-attention sees one all-zero token and pooled/class
vectors are zero, so the features are the noise-conditioned, prompt-independent ones the head was trained on.
"""
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
    def features(base_model, x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        dm = base_model.diffusion_model
        autograd_weights(dm)
        cfg = base_model.model_config.unet_config
        dtype = _compute_dtype(base_model)
        b = x_in.shape[0]
        t = base_model.model_sampling.timestep(sigma).float()
        context = torch.zeros(b, 1, cfg.get("context_dim") or 1, device=x_in.device, dtype=dtype)
        kwargs = {}
        if getattr(dm, "num_classes", None) is not None:
            kwargs["y"] = torch.zeros(b, cfg["adm_in_channels"], device=x_in.device, dtype=dtype) \
                if dm.num_classes == "sequential" else torch.zeros(b, device=x_in.device, dtype=torch.long)
        captured = {}

        def grab(_module, _inputs, output):
            captured["h"] = output
            raise _Stop

        handle = dm.middle_block[-1].register_forward_hook(grab)
        try:
            dm(x_in.to(dtype), t, context=context, transformer_options={}, **kwargs)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["h"]


TAPS = {t.name: t for t in (UNetMiddle,)}


def find_tap(diffusion_model):
    return next((t for t in TAPS.values() if t.supports(diffusion_model)), None)
