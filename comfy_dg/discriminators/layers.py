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


def init_weights(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """PyTorch's default initialisation of every layer the pack's networks use, drawn from `generator`, not from
    the process-global RNG (which a server shares with every other node). For a network built on the meta
    device and then given memory (to_empty): every parameter is set here, and buffers start at zero."""
    g, done = generator, set()

    def linear(weight, bias):
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=g)
        if bias is not None:
            fan_in = weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(bias, -bound, bound, generator=g)

    with torch.no_grad():
        for b in module.buffers():
            b.zero_()
        for m in module.modules():
            if isinstance(m, nn.MultiheadAttention):
                nn.init.xavier_uniform_(m.in_proj_weight, generator=g)
                nn.init.zeros_(m.in_proj_bias)
                nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5), generator=g)
                nn.init.zeros_(m.out_proj.bias)
                done.update(map(id, m.parameters()))
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and id(m.weight) not in done:
                linear(m.weight, m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, generator=g)
            elif isinstance(m, AttentionPool):
                nn.init.zeros_(m.query)
            else:
                continue
            done.update(id(p) for p in m.parameters(recurse=False))
    missed = [n for n, p in module.named_parameters() if id(p) not in done]
    if missed:
        raise RuntimeError(f"comfy-dg: init_weights has no rule for {missed[:3]}")
    return module


class SigmaMLP(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.emb_dim = emb_dim
        self.net = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, sigma):
        return self.net(sigma_embedding(sigma, self.emb_dim).to(self.net[0].weight.dtype))
