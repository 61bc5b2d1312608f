"""Flux (comfy.ldm.flux.model.Flux: Flux.1 dev/schnell, and Flux.2, which shares the class)."""
import torch

from .. import identity
from .common import TokenTap, compute_dtype, run_until, saved_activation_copies, token_grid


class FluxDouble(TokenTap):
    """The image tokens output by the last double-stream block, the network's middle (Flux.1: 19 double + 38
    single blocks)."""

    name = "flux_double"
    network = "flux"
    GUIDANCE = 3.5      # guidance-distilled models (guidance_embed) always saw a guidance value: ComfyUI's default

    @staticmethod
    def supports(diffusion_model) -> bool:
        dm = diffusion_model
        return identity.network(dm) == FluxDouble.network and hasattr(dm, "params") and hasattr(dm, "img_in") \
            and len(getattr(dm, "double_blocks", ())) > 0

    @staticmethod
    def features(base_model, x_in: torch.Tensor, sigma: torch.Tensor, conditioning=None) -> torch.Tensor:
        dm = base_model.diffusion_model
        params = dm.params
        dtype = compute_dtype(base_model)
        b, device = x_in.shape[0], x_in.device
        # model_base.Flux adds no timestep processing: the network gets model_sampling.timestep(σ) (= σ).
        t = base_model.model_sampling.timestep(sigma).float()
        context = torch.zeros(b, 1, params.context_in_dim, device=device, dtype=dtype)
        y = torch.zeros(b, params.vec_in_dim, device=device, dtype=dtype) if dm.vector_in is not None else None
        guidance = torch.full((b,), FluxDouble.GUIDANCE, device=device, dtype=dtype) \
            if params.guidance_embed else None
        with saved_activation_copies():
            img, _txt = run_until(dm, dm.double_blocks[-1], lambda: dm(
                x_in.to(dtype), t, context=context, y=y, guidance=guidance, transformer_options={}))
        if img.dtype == torch.float16:      # as the network does after its double blocks
            img = torch.nan_to_num(img, nan=0.0, posinf=65504, neginf=-65504)
        return token_grid(img, x_in, dm.patch_size)
