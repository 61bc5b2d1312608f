"""Real data for the benchmarks: sklearn's handwritten digits (1797 images, 8×8), as 64×64 RGB PNG files."""
import os

import numpy as np


def write_digit_folder(folder, n=None, seed=0, size=64, by_class=False):
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.images))[:n]
    for i in idx:
        px = (np.kron(d.images[i] / 16.0, np.ones((size // 8, size // 8))) * 255).astype(np.uint8)
        out = os.path.join(folder, str(d.target[i])) if by_class else folder
        os.makedirs(out, exist_ok=True)
        Image.fromarray(np.stack([px] * 3, axis=-1)).save(os.path.join(out, f"{i:04d}_{d.target[i]}.png"))
    return folder
