"""(b) features: a small trainable head on frozen features of the user's own diffusion network.

This is the paper's design (a frozen noise-conditioned encoder + a small head); here the encoder is the
diffusion model the user already has, bound at apply time, so the file holds only the head.
"""
import torch
from torch import nn
import torch.nn.functional as F

from .. import identity
from ..errors import IncompatibleDiscriminator, OptionError
from ..taps import TAPS, find_tap
from .base import Discriminator, DiscriminatorInfo
from .layers import AttentionPool, ResBlock, group_norm


class FeatureHeadDiscriminator(Discriminator):
    architecture = "features"

    def __init__(self, info: DiscriminatorInfo, tap: str = "unet_middle", feature_channels: int = 1280,
                 width: int = 128, emb_dim: int = 128, context_tokens: int = 0, context_dim: int = 0, y_dim: int = 0,
                 diffusion_model: str | None = None):
        super().__init__(info)
        if tap not in TAPS:
            raise OptionError(f"comfy-dg: unknown feature tap {tap!r}; known: {', '.join(TAPS)}")
        self.tap_class = TAPS[tap]
        # Format-1 files also named the network by ComfyUI's class name: it must be the tap's own.
        if diffusion_model is not None and identity.LEGACY_NETWORKS.get(diffusion_model) != self.tap_class.network:
            raise OptionError(f"comfy-dg: the '{tap}' tap does not read a {diffusion_model}")
        if min(context_tokens, context_dim, y_dim) < 0 or (context_tokens > 0) != (context_dim > 0) \
                or (y_dim and not context_tokens) or (context_tokens and self.tap_class.install_fast_path is None):
            raise OptionError("comfy-dg: a features head's conditioning (context_tokens, context_dim, y_dim) must be "
                             f"all zero or the context shape of a network whose tap ('{tap}') takes a prompt")
        self.tap, self.feature_channels = tap, feature_channels
        self.width, self.emb_dim = width, emb_dim
        # The conditioning the features were trained under (the user's negative prompt, as the network gets it);
        # none: the prompt-independent all-zero token.
        self.context_tokens, self.context_dim, self.y_dim = context_tokens, context_dim, y_dim
        if context_tokens:
            self.register_buffer("context", torch.zeros(context_tokens, context_dim))
        if y_dim:
            self.register_buffer("y", torch.zeros(y_dim))
        self._conditioning(emb_dim)
        self.norm_in = group_norm(feature_channels)
        self.proj = nn.Conv2d(feature_channels, width, 1)
        self.block = ResBlock(width, width, emb_dim)
        self.norm_out = group_norm(width)
        self.pool = AttentionPool(width)
        self.out = nn.Linear(width, 1)

    def config(self):
        config = {"tap": self.tap, "feature_channels": self.feature_channels, "width": self.width,
                  "emb_dim": self.emb_dim}
        if self.context_tokens:
            config.update(context_tokens=self.context_tokens, context_dim=self.context_dim, y_dim=self.y_dim)
        return config

    @property
    def conditioning(self):
        """(context (T, C), y (D,) or None) the features are taken under, or None (prompt-independent)."""
        if not self.context_tokens:
            return None
        return self.context, (self.y if self.y_dim else None)

    def set_conditioning(self, context: torch.Tensor, y: torch.Tensor | None = None):
        with torch.no_grad():
            self.context.copy_(context.reshape(self.context.shape))
            if self.y_dim:
                self.y.copy_(y.reshape(self.y.shape))

    def head(self, features: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.proj.weight.dtype
        emb = self.condition(sigma.to(dtype), labels)
        h = self.proj(self.norm_in(features.to(dtype)))
        h = self.block(h, emb)
        return self.out(self.pool(F.silu(self.norm_out(h)))).reshape(-1)

    def check_compatible(self, base_model):
        super().check_compatible(base_model)
        dm = base_model.diffusion_model
        tap = find_tap(dm)
        if tap is not self.tap_class:
            raise IncompatibleDiscriminator(
                f"comfy-dg: this features discriminator reads the '{self.tap}' features of a "
                f"{self.tap_class.network} network, but the model's network is a {identity.network(dm)}. Use a "
                "discriminator trained on this model's own features (or a standalone one).")
        channels = tap.channels(base_model)
        if channels != self.feature_channels:
            raise IncompatibleDiscriminator(
                f"comfy-dg: this features discriminator expects {self.feature_channels} feature channels from the "
                f"'{self.tap}' tap, but this model gives {channels}: it was trained for a different model. Train "
                "one for this checkpoint.")
        if self.context_tokens:
            want = tap.prompt_dims(base_model)
            if (self.context_dim, self.y_dim) != want:
                raise IncompatibleDiscriminator(
                    f"comfy-dg: this features discriminator was trained under a prompt of width {self.context_dim} "
                    f"(pooled vector {self.y_dim}), but the model takes width {want[0]} (pooled vector {want[1]}): "
                    "it was trained for a different model. Train one for this checkpoint.")

    def bind(self, base_model, labels=None):
        """logit(x_in, σ) through the model's own network (whose weights the caller has made usable by autograd:
        patch.GuidancePatch.ready)."""
        def logit(x_in, sigma):
            return self.head(self.tap_class.features(base_model, x_in, sigma, self.conditioning), sigma, labels)
        return logit

    def forward(self, features, sigma, labels=None):
        return self.head(features, sigma, labels)
