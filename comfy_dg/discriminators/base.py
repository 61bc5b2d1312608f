"""What every discriminator of the pack shares: its description (metadata) and the model-fit checks."""
import math
from dataclasses import dataclass, field, asdict

import torch
from torch import nn

from .. import identity
from ..errors import IncompatibleDiscriminator, OptionError
from .layers import SigmaMLP


@dataclass
class DiscriminatorInfo:
    latent_channels: int
    model_family: str = ""          # identity.family of the model trained for ("SD15", "SDXL", "Flux", ...)
    sigma_min: float = 0.0          # σ range seen in training
    sigma_max: float = float("inf")
    training: dict = field(default_factory=dict)   # provenance: real/fake counts, steps, held-out accuracy, ...
    num_classes: int = 0            # > 0: class-conditional (labels 0..num_classes-1; no label = unconditional)
    class_names: list = field(default_factory=list)   # the classes' names, by label (empty: unnamed)

    def to_dict(self):
        d = asdict(self)
        d["sigma_max"] = None if math.isinf(self.sigma_max) else self.sigma_max
        if not self.class_names:
            del d["class_names"]        # unnamed: files stay readable by versions without names
        return d

    def describe_classes(self) -> str:
        """'classes 0..9' or, with names, "classes 0 = 'cat', 1 = 'dog', ..." (the first 20)."""
        if not self.class_names:
            return f"classes 0..{self.num_classes - 1}"
        shown = ", ".join(f"{i} = {n!r}" for i, n in enumerate(self.class_names[:20]))
        return f"classes {shown}" + (", ..." if len(self.class_names) > 20 else "")

    def class_index(self, name: str) -> int:
        """The label of the class called `name` (exact, else the only match ignoring case)."""
        if not self.num_classes:
            raise OptionError(f"comfy-dg: class {name!r} was given but the discriminator is not class-conditional; "
                              "leave class_name empty.")
        if name in self.class_names:
            return self.class_names.index(name)
        folded = [i for i, n in enumerate(self.class_names) if n.casefold() == name.casefold()]
        if len(folded) == 1:
            return folded[0]
        raise OptionError(f"comfy-dg: the discriminator has no class named {name!r}; it knows "
                          f"{self.describe_classes()}.")

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
                and isinstance(info.training, dict) and type(info.num_classes) is int and info.num_classes >= 0
                and isinstance(info.class_names, list) and all(isinstance(n, str) for n in info.class_names)
                and len(info.class_names) in (0, info.num_classes)):
            raise TypeError("info fields have the wrong types or an empty σ range")
        return info


class Discriminator(nn.Module):
    """Base of the pack's discriminators: bind(model) -> callable(x_in, sigma) -> logit (B,)."""

    architecture = ""

    def __init__(self, info: DiscriminatorInfo):
        super().__init__()
        self.info = info

    def config(self) -> dict:
        """Hyper-parameters that rebuild the network (stored in the file's metadata)."""
        raise NotImplementedError

    def _conditioning(self, emb_dim: int):
        """The σ embedding, and for a class-conditional discriminator a label embedding added to it (the
        paper's design). Index num_classes is "no label": trained with label dropout, used unconditionally."""
        self.sigma_mlp = SigmaMLP(emb_dim)
        if self.info.num_classes:
            self.label_embed = nn.Embedding(self.info.num_classes + 1, emb_dim)

    def condition(self, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.sigma_mlp(sigma)
        if self.info.num_classes:
            if labels is None:
                labels = torch.full((len(sigma),), self.info.num_classes, dtype=torch.long, device=sigma.device)
            emb = emb + self.label_embed(labels.to(device=sigma.device, dtype=torch.long))
        return emb

    def check_compatible(self, base_model):
        channels = identity.latent_channels(base_model)
        family = identity.family(base_model)
        if channels != self.info.latent_channels:
            raise IncompatibleDiscriminator(
                f"comfy-dg: this discriminator was trained on {self.info.latent_channels}-channel latents "
                f"({self.info.model_family or 'unknown family'}) but the model has {channels}-channel latents "
                f"({family}). Load a discriminator trained for {family}, or train one with the pack's trainer.")
        if self.info.model_family and self.info.model_family != family:
            raise IncompatibleDiscriminator(
                f"comfy-dg: this discriminator was trained for {self.info.model_family} latents but the model "
                f"is {family}. Their latent spaces differ; load a discriminator trained for {family}.")

    def bind(self, base_model, labels=None):
        """callable(x_in, sigma) -> logit for this model; `labels` (B,) for a class-conditional discriminator."""
        if labels is None:
            return self
        return lambda x_in, sigma: self(x_in, sigma, labels)
