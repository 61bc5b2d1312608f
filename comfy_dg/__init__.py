"""comfy-dg: Discriminator Guidance (Kim et al., ICML 2023) for ComfyUI.

Public API:
    guide(model, discriminator, weight=1.0, start_percent=0.0, end_percent=1.0, **options) -> ModelPatcher
    load_discriminator(path) -> Discriminator
    save_discriminator(discriminator, path, training=None)
Every error the pack raises on purpose is a DGError.
"""
from .discriminators import Discriminator, DiscriminatorInfo, FeatureHeadDiscriminator, StandaloneDiscriminator
from .errors import DGError, IncompatibleDiscriminator, OptionError
from .files import DiscriminatorFileError, load_discriminator, save_discriminator
from .patch import guide

__all__ = ["guide", "load_discriminator", "save_discriminator", "Discriminator", "DiscriminatorInfo",
           "StandaloneDiscriminator", "FeatureHeadDiscriminator", "DGError", "DiscriminatorFileError",
           "IncompatibleDiscriminator", "OptionError"]
