"""The discriminator architectures, and the registry that maps a file's metadata to a class."""
from .base import Discriminator, DiscriminatorInfo, IncompatibleDiscriminator, model_family, model_latent_channels
from .features import FeatureHeadDiscriminator
from .standalone import StandaloneDiscriminator

__all__ = ["Discriminator", "DiscriminatorInfo", "IncompatibleDiscriminator", "FeatureHeadDiscriminator",
           "StandaloneDiscriminator", "ARCHITECTURES", "build", "model_family", "model_latent_channels"]

ARCHITECTURES = {cls.architecture: cls for cls in (StandaloneDiscriminator, FeatureHeadDiscriminator)}


def build(architecture: str, info: DiscriminatorInfo, config: dict) -> Discriminator:
    return ARCHITECTURES[architecture](info, **config)
