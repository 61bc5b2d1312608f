"""(a) standalone: a small noise-conditioned conv encoder on latents, any channel count and resolution."""
import torch
from torch import nn
import torch.nn.functional as F

from .base import Discriminator, DiscriminatorInfo
from .layers import AttentionPool, ResBlock, group_norm


class StandaloneDiscriminator(Discriminator):
    architecture = "standalone"

    def __init__(self, info: DiscriminatorInfo, width: int = 64, levels: int = 3, emb_dim: int = 128):
        super().__init__(info)
        self.width, self.levels, self.emb_dim = width, levels, emb_dim
        self._conditioning(emb_dim)
        self.conv_in = nn.Conv2d(info.latent_channels, width, 3, padding=1)
        chans = [width * min(2 ** i, 4) for i in range(levels)]
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch = width
        for i, c in enumerate(chans):
            self.blocks.append(ResBlock(ch, c, emb_dim))
            ch = c
            self.downs.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1) if i < levels - 1 else nn.Identity())
        self.norm_out = group_norm(ch)
        self.pool = AttentionPool(ch)
        self.out = nn.Linear(ch, 1)

    def config(self):
        return {"width": self.width, "levels": self.levels, "emb_dim": self.emb_dim}

    def forward(self, x_in: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.conv_in.weight.dtype
        emb = self.condition(sigma.to(dtype), labels)
        h = self.conv_in(x_in.to(dtype))
        for block, down in zip(self.blocks, self.downs):
            # Latents smaller than the network's reach stop being downsampled instead of vanishing.
            h = block(h, emb)
            if min(h.shape[-2:]) >= 2:
                h = down(h)
        h = F.silu(self.norm_out(h))
        return self.out(self.pool(h)).reshape(-1)
