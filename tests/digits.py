"""Real data for tests: sklearn's handwritten digits (8×8, 0..16), written as 64×64 RGB PNG files."""
import os

import numpy as np
from PIL import Image


def digit_images(n, seed=0):
    from sklearn.datasets import load_digits
    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.images))[:n]
    return d.images[idx] / 16.0, d.target[idx]


def write_digit_folder(folder, n, seed=0, size=64, by_class=False):
    """n digit images; with by_class, in one subfolder per digit (folder/<digit>/…)."""
    images, labels = digit_images(n, seed)
    for i, (img, label) in enumerate(zip(images, labels)):
        px = (np.kron(img, np.ones((size // 8, size // 8))) * 255).astype(np.uint8)
        out = os.path.join(folder, str(label)) if by_class else folder
        os.makedirs(out, exist_ok=True)
        Image.fromarray(np.stack([px] * 3, axis=-1)).save(os.path.join(out, f"{i:04d}_{label}.png"))
    return folder
