"""Pictures the pack shows: labelled grids of image batches, side by side."""
import math

import numpy as np
import torch

from .errors import DGError


def rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) from a ComfyUI IMAGE of 3 channels, 4 (RGBA, as core's Join Image with Alpha makes:
    composited over the grid's white) or 1 (grey)."""
    images = images.detach().float()
    if images.ndim == 3:
        images = images[None]
    channels = images.shape[-1] if images.ndim == 4 else 0
    if channels == 4:
        alpha = images[..., 3:].clamp(0, 1)
        return images[..., :3] * alpha + (1.0 - alpha)
    if channels == 1:
        return images.expand(*images.shape[:-1], 3)
    if channels != 3:
        raise DGError(f"comfy-dg: expected images of shape (batch, height, width, 3 or 4 channels); got "
                      f"{tuple(images.shape)}")
    return images


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) uint8 from a ComfyUI IMAGE in [0, 1] of 3, 4 or 1 channels (rgb)."""
    return (rgb(images).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def tile(images: torch.Tensor, columns: int = 0, pad: int = 2) -> np.ndarray:
    """(B, H, W, C) in [0, 1], C = 3, 4 or 1 → one uint8 RGB grid (rows × columns), white padding."""
    imgs = _uint8(images)
    b, h, w, _ = imgs.shape
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k in range(b):
        r, c = divmod(k, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = imgs[k]
    return out


def side_by_side(panels, columns: int = 0) -> np.ndarray:
    """[(images (B, H, W, 3), label)] → one labelled uint8 picture, panels left to right."""
    from PIL import Image, ImageDraw
    grids = [tile(images, columns) for images, _ in panels]
    height = max(g.shape[0] for g in grids)
    label_h, gap = 18, 12
    width = sum(g.shape[1] for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, height + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for g, (_, label) in zip(grids, panels):
        canvas.paste(Image.fromarray(g), (x, label_h))
        draw.text((x + 2, 3), str(label), fill=(0, 0, 0))
        x += g.shape[1] + gap
    return np.array(canvas)


def scored_grid(images: torch.Tensor, scores, kept: int, columns: int = 0, min_cell: int = 64) -> np.ndarray:
    """Images (B, H, W, C) in [0, 1], C = 3, 4 or 1, already sorted best first, each with its score written under
    it; the first `kept` framed in green, the rest dimmed. One uint8 picture."""
    from PIL import Image, ImageDraw
    pixels = _uint8(images)
    b, h, w, _ = pixels.shape
    scale = max(1, -(-min_cell // max(1, min(h, w))))        # small images (latent-size digits) are enlarged
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    cw, ch, pad, text_h = w * scale, h * scale, 4, 14
    canvas = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k in range(b):
        r, c = divmod(k, cols)
        x, y = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
        tile_img = Image.fromarray(pixels[k]).resize((cw, ch), Image.Resampling.NEAREST)
        if k >= kept:
            tile_img = Image.blend(tile_img, Image.new("RGB", tile_img.size, (255, 255, 255)), 0.6)
        canvas.paste(tile_img, (x, y))
        if k < kept:
            draw.rectangle([x - 2, y - 2, x + cw + 1, y + ch + 1], outline=(0, 170, 0), width=2)
        draw.text((x + 1, y + ch + 1), f"#{k + 1} {float(scores[k]):+.2f}", fill=(0, 0, 0) if k < kept else (140, 140, 140))
    return np.array(canvas)


def latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """A crude picture of latents without a VAE: (B, H, W, 3) in [0, 1] from the first three channels (or the
    first, in gray), scaled by the batch's own range. For the demo's pixel-space digits it is the digits."""
    x = latents.detach().float().cpu()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / max(hi - lo, 1e-8)).movedim(1, -1).contiguous()
