"""Augmentation of clean latents with kornia, applied alike to real and fake (so it cannot leak the label)."""
import torch


class LatentAugment:
    def __init__(self, flip: bool = True, translate: float = 0.0625):
        import kornia.augmentation as K
        ops = []
        if flip:
            ops.append(K.RandomHorizontalFlip(p=0.5))
        if translate > 0:
            ops.append(K.RandomAffine(degrees=0.0, translate=(translate, translate), padding_mode="reflection",
                                      p=0.5))
        self.ops = torch.nn.Sequential(*ops)

    def __call__(self, x0: torch.Tensor, seed: int) -> torch.Tensor:
        if len(self.ops) == 0:
            return x0
        # kornia draws from torch's global generator: fork it so every rank and every resume draws the same.
        devices = [x0.device] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.ops(x0)
