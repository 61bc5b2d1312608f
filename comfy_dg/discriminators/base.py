"""What every discriminator of the pack shares: its description (metadata) and the model-fit checks."""
import math
from dataclasses import dataclass, field, asdict

import torch
from torch import nn


class IncompatibleDiscriminator(ValueError):
    """The discriminator was trained for another kind of model than the one it is applied to."""


@dataclass
class DiscriminatorInfo:
    latent_channels: int
    model_family: str = ""          # ComfyUI latent format the discriminator was trained on ("SD15", "SDXL", "Flux", ...)
    sigma_min: float = 0.0          # σ range seen in training
    sigma_max: float = float("inf")
    training: dict = field(default_factory=dict)   # provenance: real/fake counts, steps, held-out accuracy, ...

    def to_dict(self):
        d = asdict(self)
        d["sigma_max"] = None if math.isinf(self.sigma_max) else self.sigma_max
        return d

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise TypeError("info is not an object")
        d = dict(d)
        if d.get("sigma_max") is None:
            d["sigma_max"] = float("inf")
        info = cls(**d)
        number = lambda v: type(v) in (int, float) and not math.isnan(v)  # noqa: E731 - bools are not numbers
        if not (type(info.latent_channels) is int and info.latent_channels > 0 and isinstance(info.model_family, str)
                and number(info.sigma_min) and number(info.sigma_max) and 0 <= info.sigma_min <= info.sigma_max
                and isinstance(info.training, dict)):
            raise TypeError("info fields have the wrong types or an empty σ range")
        return info


def model_family(base_model) -> str:
    """The name ComfyUI gives the model's latent format (SD15, SDXL, SD3, Flux, ...)."""
    return type(base_model.latent_format).__name__


def model_latent_channels(base_model) -> int:
    return int(base_model.latent_format.latent_channels)


def sigma_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of c_noise = log(σ)/4 (EDM's noise conditioning), for any model type."""
    c = sigma.clamp_min(1e-6).log().reshape(-1, 1) / 4.0
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=sigma.device, dtype=c.dtype))
    angles = c * freqs * 10.0
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Discriminator(nn.Module):
    """Base of the pack's discriminators: bind(model) -> callable(x_in, sigma) -> logit (B,)."""

    architecture = ""

    def __init__(self, info: DiscriminatorInfo):
        super().__init__()
        self.info = info

    def config(self) -> dict:
        """Hyper-parameters that rebuild the network (stored in the file's metadata)."""
        raise NotImplementedError

    def check_compatible(self, base_model):
        channels = model_latent_channels(base_model)
        family = model_family(base_model)
        if channels != self.info.latent_channels:
            raise IncompatibleDiscriminator(
                f"comfy-dg: this discriminator was trained on {self.info.latent_channels}-channel latents "
                f"({self.info.model_family or 'unknown family'}) but the model has {channels}-channel latents "
                f"({family}). Load a discriminator trained for {family}, or train one with the pack's trainer.")
        if self.info.model_family and self.info.model_family != family:
            raise IncompatibleDiscriminator(
                f"comfy-dg: this discriminator was trained for {self.info.model_family} latents but the model "
                f"is {family}. Their latent spaces differ; load a discriminator trained for {family}.")

    def bind(self, base_model):
        return self
