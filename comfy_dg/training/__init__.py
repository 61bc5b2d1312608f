"""Training a discriminator for the user's own model: data, the loop, the CLI (`python -m comfy_dg.train`)."""
from .loop import TrainConfig, Trainer, TrainingError

__all__ = ["TrainConfig", "Trainer", "TrainingError"]
