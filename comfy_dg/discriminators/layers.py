"""Small building blocks shared by the discriminator networks."""
import math

import torch
from torch import nn
import torch.nn.functional as F


def group_norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Pre-norm residual conv block whose scale and shift come from the σ embedding (FiLM)."""

    def __init__(self, ch_in: int, ch_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = group_norm(ch_in)
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * ch_out)
        self.norm2 = group_norm(ch_out)
        self.conv2 = nn.Conv2d(ch_out, ch_out, 3, padding=1)
        self.skip = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, h, emb):
        out = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        out = self.norm2(out) * (1 + scale) + shift
        out = self.conv2(F.silu(out))
        return self.skip(h) + out


class AttentionPool(nn.Module):
    """One learned query attends over all positions (the paper's head pools this way)."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        heads = heads if channels % heads == 0 else 1
        self.query = nn.Parameter(torch.zeros(1, 1, channels))
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, h):
        tokens = h.flatten(2).transpose(1, 2)                      # (B, HW, C)
        q = self.query.expand(h.shape[0], -1, -1) + tokens.mean(dim=1, keepdim=True)
        pooled, _ = self.attn(q, tokens, tokens, need_weights=False)
        return pooled[:, 0]


def sigma_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of c_noise = log(σ)/4 (EDM's noise conditioning), for any model type."""
    c = sigma.clamp_min(1e-6).log().reshape(-1, 1) / 4.0
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=sigma.device, dtype=c.dtype))
    angles = c * freqs * 10.0
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class SigmaMLP(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.emb_dim = emb_dim
        self.net = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, sigma):
        return self.net(sigma_embedding(sigma, self.emb_dim).to(self.net[0].weight.dtype))
