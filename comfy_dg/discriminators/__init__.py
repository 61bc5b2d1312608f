"""The discriminator architectures, and the registry that maps a file's metadata to a class."""
from .base import Discriminator, DiscriminatorInfo
from .features import FeatureHeadDiscriminator
from .standalone import StandaloneDiscriminator

__all__ = ["Discriminator", "DiscriminatorInfo", "FeatureHeadDiscriminator", "StandaloneDiscriminator",
           "ARCHITECTURES", "build"]

ARCHITECTURES = {cls.architecture: cls for cls in (StandaloneDiscriminator, FeatureHeadDiscriminator)}


def build(architecture: str, info: DiscriminatorInfo, config: dict) -> Discriminator:
    return ARCHITECTURES[architecture](info, **config)
