"""Training data: a folder of real images encoded with the model's VAE, and fake samples of the model itself,
each cached on disk as safetensors so that re-runs skip the work. A cache is rebuilt, never trusted, when it
cannot be read or does not match."""
import hashlib
import json
import logging
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open

from ..atomic import save_safetensors
from ..errors import DataError

log = logging.getLogger("comfy_dg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CACHE_KEY = "comfy_dg.cache"


def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise DataError(f"comfy-dg: the real-image folder '{folder}' does not exist. Give a folder of png, jpg or "
                        "webp images (relative to ComfyUI's input folder, or absolute).")
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise DataError(f"comfy-dg: the real-image folder '{folder}' holds no png, jpg or webp images.")
    return files


def folder_labels(folder: str, files: list[str]):
    """Class labels from subfolder names: folder/<class>/image.png. Returns (labels (N,), class names)."""
    classes = [os.path.relpath(f, folder).replace("\\", "/").split("/")[0] for f in files]
    if any(c == os.path.basename(f) for c, f in zip(classes, files)):
        raise DataError(f"comfy-dg: class labels come from subfolders (folder/<class>/image.png), but '{folder}' "
                        "has images at its top level. Move each image into its class's subfolder.")
    names = sorted(set(classes))
    return torch.tensor([names.index(c) for c in classes]), names


def load_image(path: str, resolution: int) -> torch.Tensor:
    """(resolution, resolution, 3) in [0, 1]: shorter side resized to `resolution`, then center-cropped."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.Resampling.BICUBIC)
            w, h = im.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"comfy-dg: cannot read image '{path}' ({e}). Remove or replace it.") from None


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(str((tuple(p.shape), str(p.dtype))).encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def module_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of a network's weights: every tensor's name, shape and first values."""
    parts = []
    for name, p in module.state_dict().items():
        parts.append([name, list(p.shape), p.detach().flatten()[:64].float().cpu().tolist()])
    return _digest(parts)


def model_fingerprint(model_patcher) -> str:
    patches = sorted((k, [str(getattr(x, "shape", x)) for x in v]) for k, v in model_patcher.patches.items())
    return _digest(module_fingerprint(model_patcher.model.diffusion_model), patches)


def _checksum(latents: torch.Tensor) -> str:
    return hashlib.sha256(latents.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def read_cache(path: str, expect_count: int | None = None):
    """The cached latents, or None when there is no cache or it cannot be trusted: unreadable, not the shape
    asked for, non-finite, or not the bytes that were written (each cache records the SHA-256 of its latents, so
    damage that still parses, such as flipped bits in the data, is caught too). A damaged cache is rebuilt."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, "pt") as f:
            facts = json.loads((f.metadata() or {}).get(CACHE_KEY, "null"))
            if not isinstance(facts, dict) or not isinstance(facts.get("sha256"), str):
                raise ValueError("no checksum in its metadata")
            if sorted(f.keys()) != ["latents"]:
                raise ValueError(f"tensors {sorted(f.keys())[:5]} instead of one 'latents'")
            latents = f.get_tensor("latents")
        if latents.dtype != torch.float32 or latents.ndim != 4 \
                or (expect_count is not None and len(latents) != expect_count):
            raise ValueError(f"unexpected contents ({latents.dtype}, shape {tuple(latents.shape)})")
        if _checksum(latents) != facts["sha256"]:
            raise ValueError("its latents do not match their checksum")
        if not torch.isfinite(latents).all():
            raise ValueError("non-finite latents")
        return latents
    except Exception as e:   # a damaged cache is rebuilt, never trusted
        log.warning("comfy-dg: ignoring damaged cache %s (%s); rebuilding it.", path, str(e)[:200])
        return None


def write_cache(path: str, latents: torch.Tensor, facts: dict):
    latents = latents.detach().float().cpu().contiguous()
    save_safetensors({"latents": latents}, path, {CACHE_KEY: json.dumps({**facts, "sha256": _checksum(latents)})})


def encode_folder(folder, vae, resolution, batch_size, cache_dir=None, progress=None, should_stop=None):
    """Latents (N, C, h, w) of every image in `folder`, encoded by the ComfyUI VAE `vae` in batches."""
    files = list_images(folder)
    stamp = [[os.path.relpath(f, folder), os.path.getsize(f), int(os.path.getmtime(f))] for f in files]
    key = _digest(stamp, resolution, module_fingerprint(vae.first_stage_model))
    path = os.path.join(cache_dir, f"real-{key}.safetensors") if cache_dir else None
    cached = read_cache(path, len(files)) if path else None
    if cached is not None:
        return cached
    out = []
    for i in range(0, len(files), batch_size):
        if should_stop is not None:
            should_stop()
        pixels = torch.stack([load_image(f, resolution) for f in files[i:i + batch_size]])
        out.append(vae.encode(pixels).float().cpu())
        if progress is not None:
            progress(min(i + batch_size, len(files)), len(files))
    latents = torch.cat(out)
    if path:
        write_cache(path, latents, {"kind": "real", "folder": folder, "images": len(files), "resolution": resolution})
    return latents


def sample_fakes(model_patcher, positive, negative, count, batch_size, seed, steps, cfg, sampler_name, scheduler,
                 width, height, cache_dir=None, progress=None, should_stop=None):
    """`count` samples of the model with the user's own settings, through ComfyUI's sampling, as latents."""
    import comfy.sample
    if count < 2:
        raise DataError("comfy-dg: generate at least 2 fake samples (as many as real images is a good default)")
    channels = model_patcher.model.latent_format.latent_channels
    shape = (channels, height // 8, width // 8)
    settings = [count, seed, steps, cfg, sampler_name, scheduler, list(shape)]
    conds = [c[0] for c in positive] + [c[0] for c in negative]
    key = _digest(settings, model_fingerprint(model_patcher), *conds)
    path = os.path.join(cache_dir, f"fake-{key}.safetensors") if cache_dir else None
    cached = read_cache(path, count) if path else None
    if cached is not None:
        return cached
    out = []
    for i in range(0, count, batch_size):
        if should_stop is not None:
            should_stop()
        n = min(batch_size, count - i)
        latent = torch.zeros(n, *shape)
        noise = comfy.sample.prepare_noise(latent, seed + i)
        out.append(comfy.sample.sample(model_patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                       latent, seed=seed + i, disable_pbar=True).float().cpu())
        if progress is not None:
            progress(i + n, count)
    latents = torch.cat(out)
    if path:
        write_cache(path, latents, {"kind": "fake", "settings": settings})
    return latents
