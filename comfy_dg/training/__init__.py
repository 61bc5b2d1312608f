"""Training a discriminator for the user's own model: data, the loop, the CLI (`python -m comfy_dg.train`)."""
from ..errors import TrainingError
from .loop import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer", "TrainingError"]
