"""SD3 / SD3.5 (comfy.ldm.modules.diffusionmodules.mmdit.MMDiT)."""
import torch

from .. import identity
from .common import TokenTap, compute_dtype, run_until, saved_activation_copies, token_grid


class MMDiTMiddle(TokenTap):
    """The image tokens output by the middle joint block, joint_blocks[depth // 2]."""

    name = "mmdit_middle"
    network = "mmdit"

    @staticmethod
    def supports(diffusion_model) -> bool:
        dm = diffusion_model
        return identity.network(dm) == MMDiTMiddle.network and hasattr(dm, "x_embedder") \
            and len(getattr(dm, "joint_blocks", ())) > 0

    @staticmethod
    def features(base_model, x_in: torch.Tensor, sigma: torch.Tensor, conditioning=None) -> torch.Tensor:
        dm = base_model.diffusion_model
        dtype = compute_dtype(base_model)
        b, device = x_in.shape[0], x_in.device
        t = base_model.model_sampling.timestep(sigma).float()
        context_dim = getattr(dm.context_embedder, "in_features", None) or dm.hidden_size
        context = torch.zeros(b, 1, context_dim, device=device, dtype=dtype)
        y = None
        if dm.y_embedder is not None:
            y = torch.zeros(b, dm.y_embedder.mlp[0].in_features, device=device, dtype=dtype)
        block = dm.joint_blocks[len(dm.joint_blocks) // 2]
        with saved_activation_copies():      # no in-place updates in ComfyUI 0.3.75's MMDiT; cheap insurance
            _context, x = run_until(dm, block, lambda: dm(x_in.to(dtype), t, context=context, y=y,
                                                          transformer_options={}))
        return token_grid(x, x_in, dm.patch_size)
