"""Training data: a folder of real images encoded with the model's VAE, and fake samples of the model itself,
each cached on disk as safetensors so that re-runs skip the work. A cache is rebuilt, never trusted, when it
cannot be read or does not match; a bounded cache drops its least recently used entries.

Unreadable files have one policy: a file with an image suffix that cannot be read as an image (not a regular file,
a broken link, a link out of the allowed folders, a damaged image, an image too large to decode) stops the run
with its name, before anything is cached; nothing is skipped silently. Hidden files and folders (a leading '.',
such as macOS's '._x.png' or '.DS_Store') and files without an image suffix are not data and are left alone."""
import hashlib
import json
import logging
import math
import os
import stat

import numpy as np
import torch
from safetensors import safe_open

from ..atomic import save_safetensors
from ..errors import DataError
from ..fingerprint import content_digest, module_weights
from ..locations import file_kind, within

log = logging.getLogger("comfy_dg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CACHE_KEY = "comfy_dg.cache"
CACHE_PREFIXES = ("real-", "fake-")


class Interrupted(DataError):
    """should_stop() asked to stop while data was being prepared: nothing was cached."""


def _poll(should_stop, doing):
    if should_stop is not None and should_stop():
        raise Interrupted(f"comfy-dg: stopped while {doing}; nothing was cached.")


def _check_file(path, rel, roots):
    """Refuse what cannot be read as a file of images: the file's name and the reason."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"comfy-dg: cannot read '{rel}' in the image folder: it is a symbolic link to a file that "
                        "does not exist. Fix or remove the link.") from None
    except OSError as e:
        raise DataError(f"comfy-dg: cannot read '{rel}' in the image folder ({e.strerror or e}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"comfy-dg: cannot read '{rel}' in the image folder: it is {file_kind(st.st_mode)}, not a "
                        "regular file. Remove it; only image files are read.")
    if roots is not None and not any(within(r, path) for r in roots):
        raise DataError(f"comfy-dg: '{rel}' in the image folder links to a file outside ComfyUI's input folder, "
                        "which the pack does not read. Copy the file into the folder instead of linking it.")


def list_images(folder: str, roots=None, should_stop=None) -> list[str]:
    """Every image file (png, jpg, webp) under `folder`, subfolders included, in a stable order. With `roots`,
    each file and subfolder must resolve inside one of them (symbolic links followed). should_stop() is polled
    while listing, and True raises Interrupted."""
    if not os.path.isdir(folder):
        raise DataError(f"comfy-dg: the real-image folder '{os.path.basename(os.path.normpath(folder))}' does not "
                        "exist. Give a folder of png, jpg or webp images inside ComfyUI's input folder.")
    files, seen, pending = [], set(), [folder]
    while pending:
        _poll(should_stop, "listing the real images")
        here = pending.pop()
        try:
            st = os.stat(here)
            if (st.st_dev, st.st_ino) in seen:      # a folder linked twice, or a link loop
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"comfy-dg: cannot list '{os.path.relpath(here, folder)}' in the image folder "
                            f"({e.strerror or e}).") from None
        subfolders = []
        for i, entry in enumerate(entries):
            if i % 256 == 255:
                _poll(should_stop, "listing the real images")
            if entry.name.startswith("."):
                continue
            rel = os.path.relpath(entry.path, folder)
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if roots is not None and not any(within(r, entry.path) for r in roots):
                    raise DataError(f"comfy-dg: the subfolder '{rel}' of the image folder links outside ComfyUI's "
                                    "input folder, which the pack does not read. Copy the images instead.")
                subfolders.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                _check_file(entry.path, rel, roots)
                files.append(entry.path)
        pending.extend(reversed(subfolders))
    if not files:
        raise DataError(f"comfy-dg: the real-image folder '{os.path.basename(os.path.normpath(folder))}' holds no "
                        "png, jpg or webp images.")
    return sorted(files)


def class_order(names):
    """Class names in the order their indices follow: alphabetical without regard to case."""
    return sorted(set(names), key=lambda c: (c.casefold(), c))


def folder_labels(folder: str, files: list[str]):
    """Class labels from subfolder names: folder/<class>/image.png. Returns (labels (N,), class names)."""
    classes = [os.path.relpath(f, folder).replace("\\", "/").split("/")[0] for f in files]
    if any(c == os.path.basename(f) for c, f in zip(classes, files)):
        raise DataError(f"comfy-dg: class labels come from subfolders (folder/<class>/image.png), but "
                        f"'{os.path.basename(os.path.normpath(folder))}' has images at its top level. Move each image "
                        "into its class's subfolder.")
    names = class_order(classes)
    index = {c: i for i, c in enumerate(names)}
    return torch.tensor([index[c] for c in classes]), names


def load_image(path: str, resolution: int, name: str | None = None) -> torch.Tensor:
    """(resolution, resolution, 3) in [0, 1]: turned upright by its EXIF orientation and read as ComfyUI's Load
    Image reads it, then its centred square cropped and resized to `resolution` in one step (so that memory
    stays of the order of the source and the output, whatever the aspect ratio)."""
    import node_helpers
    from PIL import Image, ImageOps, UnidentifiedImageError
    name = name or os.path.basename(path)
    try:
        # Opened without blocking and checked again: a file swapped for a FIFO since it was listed cannot hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise DataError(f"comfy-dg: cannot read '{name}' in the image folder: it is {file_kind(mode)}, not "
                                "a regular file. Remove it.")
            with node_helpers.pillow(Image.open, f) as im:
                im = node_helpers.pillow(ImageOps.exif_transpose, im)
                if im.mode == "I":
                    im = im.point(lambda v: v * (1 / 255))
                im = im.convert("RGB")
                w, h = im.size
                side = min(w, h)
                box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
                im = im.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
                return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    except Image.DecompressionBombError as e:
        raise DataError(f"comfy-dg: cannot read image '{name}': {e} Resize it.") from None
    except MemoryError:
        raise DataError(f"comfy-dg: cannot read image '{name}': not enough memory to decode it. Resize it.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"comfy-dg: cannot read image '{name}' ({e}). Remove or replace it.") from None


def latent_bytes(count: int, shape) -> int:
    return count * math.prod(int(s) for s in shape) * 4


def check_size(count, shape, max_bytes, what):
    """Refuse, before any work, a set of float32 latents larger than `max_bytes` (None: no bound)."""
    need = latent_bytes(count, shape)
    if max_bytes is not None and need > max_bytes:
        raise DataError(f"comfy-dg: {count} {what} of shape {tuple(int(s) for s in shape)} would take "
                        f"{_size(need)}, more than the {_size(max_bytes)} this server allows for one set of latents "
                        "(its COMFY_DG_MAX_LATENT_GB setting). Use fewer or smaller images, or train with the command "
                        "line (python -m comfy_dg.train).")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


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
    """A cheap identity of a network's weights: every tensor's name, shape, dtype and first values."""
    return _digest(module_weights(module))


def model_fingerprint(model_patcher) -> str:
    """What the model computes, by content: its unpatched weights, model sampling, and every patch and option
    (LoRA weights by their values, ModelSamplingDiscrete/SD3/Flux, model options and wrappers)."""
    return content_digest(model_patcher) or "unfingerprintable"


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


def _cache_entries(cache_dir):
    """(last use, size, path) of every cache file in `cache_dir`, oldest use first."""
    out = []
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return out
    for n in names:
        if n.startswith(CACHE_PREFIXES) and n.endswith(".safetensors"):
            p = os.path.join(cache_dir, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((st.st_mtime, st.st_size, p))
    return sorted(out)


def evict(cache_dir, limit_bytes, keep=None) -> list[str]:
    """Remove the least recently used cache files until the cache holds at most `limit_bytes` (never `keep`, the
    entry just written); returns the names removed."""
    entries = _cache_entries(cache_dir)
    total, removed = sum(size for _, size, _ in entries), []
    for _, size, path in entries:
        if total <= limit_bytes:
            break
        if keep is not None and os.path.abspath(path) == os.path.abspath(keep):
            continue
        try:
            os.remove(path)
        except OSError:
            continue
        total -= size
        removed.append(os.path.basename(path))
    if removed:
        log.info("comfy-dg: the latent cache is bounded to %s: removed %d least recently used file(s)",
                 _size(limit_bytes), len(removed))
    return removed


class Cache:
    """One entry of the latent cache in `folder` (no folder or name: nothing cached), bounded to `limit_bytes`
    (None: unbounded; 0: nothing cached) with least-recently-used eviction; a hit counts as a use."""

    def __init__(self, folder, name, limit_bytes=None, count=None):
        self.limit = limit_bytes
        self.path = os.path.join(folder, name) if folder and name and limit_bytes != 0 else None
        self.count = count

    def read(self):
        if self.path is None:
            return None
        latents = read_cache(self.path, self.count)
        if latents is not None:
            if self.limit is not None:        # its last use, for eviction (an unbounded cache is only read)
                try:
                    os.utime(self.path)
                except OSError:
                    pass
            log.info("comfy-dg: %d latents from the cache (%s)", len(latents), os.path.basename(self.path))
        return latents

    def write(self, latents, facts):
        if self.path is None:
            return
        size = latent_bytes(len(latents), latents.shape[1:])
        if self.limit is not None and size > self.limit:
            log.info("comfy-dg: %s of latents exceed the cache's bound of %s: not cached", _size(size),
                     _size(self.limit))
            return
        write_cache(self.path, latents, facts)
        log.info("comfy-dg: %d latents cached (%s)", len(latents), os.path.basename(self.path))
        if self.limit is not None:
            evict(os.path.dirname(self.path), self.limit, keep=self.path)


def folder_stamp(folder, roots=None, should_stop=None):
    """(files, a digest of their names, sizes and modification times): what tells a changed folder."""
    files = list_images(folder, roots, should_stop)
    stamp = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise DataError(f"comfy-dg: cannot read '{os.path.relpath(f, folder)}' in the image folder "
                            f"({e.strerror or e}).") from None
        stamp.append([os.path.relpath(f, folder), st.st_size, st.st_mtime_ns])
    return files, _digest(stamp)


def encode_folder(folder, vae, resolution, batch_size, cache_dir=None, progress=None, should_stop=None, roots=None,
                  max_bytes=None, cache_bytes=None):
    """Latents (N, C, h, w) of every image in `folder`, encoded by the ComfyUI VAE `vae` in batches.

    roots: the folders files may resolve into (None: anywhere); max_bytes: refuse more latents than this (None: no
    bound); cache_bytes: the bound of the cache in `cache_dir` (None: unbounded; 0: no cache). should_stop() is
    polled for every image, and True raises Interrupted."""
    files, stamp = folder_stamp(folder, roots, should_stop)
    scale = int(getattr(vae, "spacial_compression_encode", lambda: 8)())
    channels = int(getattr(vae, "latent_channels", 4))
    check_size(len(files), (channels, resolution // scale, resolution // scale), max_bytes, "real latents")
    key = _digest(stamp, resolution, module_fingerprint(vae.first_stage_model))
    cache = Cache(cache_dir, f"real-{key}.safetensors", cache_bytes, len(files))
    cached = cache.read()
    if cached is not None:
        return cached
    out = []
    for i in range(0, len(files), batch_size):
        pixels = []
        for f in files[i:i + batch_size]:
            _poll(should_stop, "encoding the real images")
            pixels.append(load_image(f, resolution, os.path.relpath(f, folder)))
        out.append(vae.encode(torch.stack(pixels)).float().cpu())
        if progress is not None:
            progress(min(i + batch_size, len(files)), len(files))
    latents = torch.cat(out)
    cache.write(latents, {"kind": "real", "folder": os.path.basename(os.path.normpath(folder)), "images": len(files),
                          "resolution": resolution})
    return latents


def sample_fakes(model_patcher, positive, negative, count, batch_size, seed, steps, cfg, sampler_name, scheduler,
                 width, height, cache_dir=None, progress=None, should_stop=None, max_bytes=None, cache_bytes=None):
    """`count` samples of the model with the user's own settings, through ComfyUI's sampling, as latents.

    The cache key covers, by content, everything that changes the samples: the model (weights, LoRA and other
    patches, model sampling, model options), both conditionings with all their settings, and every sampling
    setting including the batch size (each batch has its own noise). should_stop() is polled at every sampling
    step, and True raises Interrupted."""
    import comfy.sample
    if count < 2:
        raise DataError("comfy-dg: generate at least 2 fake samples (as many as real images is a good default)")
    if not (isinstance(cfg, (int, float)) and math.isfinite(cfg)):
        raise DataError(f"comfy-dg: cfg is {cfg}; give a finite number (e.g. 7).")
    channels = model_patcher.model.latent_format.latent_channels
    shape = (channels, height // 8, width // 8)
    check_size(count, shape, max_bytes, "fake latents")
    settings = [count, batch_size, seed, steps, float(cfg), sampler_name, scheduler, list(shape)]
    key = content_digest(settings, model_patcher, positive, negative)
    if key is None:
        log.warning("comfy-dg: the model or conditioning is too intricate to fingerprint; the fakes are not cached")
    cache = Cache(cache_dir, key and f"fake-{key}.safetensors", cache_bytes, count)
    cached = cache.read()
    if cached is not None:
        return cached

    def step(i, denoised, x, total):
        _poll(should_stop, "sampling the fake latents")
    out = []
    for i in range(0, count, batch_size):
        _poll(should_stop, "sampling the fake latents")
        n = min(batch_size, count - i)
        latent = torch.zeros(n, *shape)
        noise = comfy.sample.prepare_noise(latent, seed + i)
        batch = comfy.sample.sample(model_patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                    latent, seed=seed + i, disable_pbar=True, callback=step).float().cpu()
        if not torch.isfinite(batch).all():
            raise DataError(f"comfy-dg: the model's samples (seed {seed + i}) hold NaN or infinite values, so they "
                            "cannot be training data; nothing was cached. Check the model, its patches and the "
                            "sampling settings (cfg, sampler).")
        out.append(batch)
        if progress is not None:
            progress(i + n, count)
    latents = torch.cat(out)
    cache.write(latents, {"kind": "fake", "settings": settings})
    return latents


# --- class labels travelling with latents: indices, and the names they stand for --------------------------------
def _remap(labels, names, into):
    index = {n: i for i, n in enumerate(into)}
    return torch.tensor([index[names[int(k)]] for k in labels], dtype=torch.long)


def combine_labels(a, b):
    """(labels, names) of two labelled batches joined, a first; each is (labels or None, names or None). Named
    classes are merged by name (the union, in class order); unnamed ones are indices as given."""
    (la, na), (lb, nb) = a, b
    if la is None and lb is None:
        return None, None
    if la is None or lb is None:
        raise DataError("comfy-dg: one batch has class labels and the other has none; label both or neither")
    if (na is None) != (nb is None):
        raise DataError("comfy-dg: one batch's classes have names and the other's are numbers; give both their "
                        "classes by name (class_name, or folders) or both by number (class_label)")
    if na is None:
        return torch.cat([la, lb]), None
    names = class_order(list(na) + list(nb))
    return torch.cat([_remap(la, na, names), _remap(lb, nb, names)]), names


def align_labels(real, fake):
    """(real labels, fake labels, class names) for training, from (labels, names) of the real and the fake
    latents: named fake classes take the index of the real class of the same name."""
    (lr, nr), (lf, nf) = real, fake
    if nf is not None:
        if lr is None or nr is None:
            raise DataError("comfy-dg: the fakes' classes have names but the real latents' classes do not; encode "
                            "the real images with labels_from_subfolders, or label the fakes by number")
        missing = sorted(set(nf) - set(nr))
        if missing:
            raise DataError(f"comfy-dg: the fakes' classes {missing[:5]} have no real images (the real classes are "
                            f"{list(nr)[:20]}); name the fakes' classes as the real images' subfolders are named")
        lf = _remap(lf, nf, nr)
    return lr, lf, (list(nr) if nr is not None else None)
