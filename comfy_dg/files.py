"""Discriminator files: .safetensors with comfy-dg metadata. Nothing is ever unpickled.

Metadata keys (all strings, as safetensors requires):
    comfy_dg.format        "2" (format 1, read too, named a features head's network by ComfyUI's class name)
    comfy_dg.architecture  "standalone" | "features"
    comfy_dg.config        JSON: the architecture's hyper-parameters
    comfy_dg.info          JSON: latent_channels, model_family, sigma_min, sigma_max, training provenance
Model families and networks are the pack's own names (identity.py), never ComfyUI's class names.
"""
import dataclasses
import hashlib
import json
import math
import os
import stat
import struct

import torch

from .atomic import save_safetensors
from .discriminators import ARCHITECTURES, Discriminator, DiscriminatorInfo, build
from .errors import DGError
from .locations import file_kind, numbered_names

FORMAT_VERSION = "2"
READS = ("1", "2")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Hyper-parameters that count repeated blocks. Each block holds several tensors, so a file cannot declare more
# blocks than it has tensors; checked before the architecture is built to compare with the file, since building
# it (even without memory for the weights) costs time and memory in proportion to the count.
BLOCK_COUNTS = ("levels",)
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class DiscriminatorFileError(DGError):
    def __init__(self, path, problem, fix):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"comfy-dg: cannot load discriminator '{os.path.basename(str(path))}': {problem}. {fix}")


def save_discriminator(discriminator: Discriminator, path, training: dict | None = None, overwrite: bool = True) -> str:
    """Write the discriminator to `path` (.safetensors) atomically: a crash leaves any old file intact. With
    overwrite=False an existing file is never replaced: the next free numbered name is taken instead
    (path_00001_.safetensors, ..., as ComfyUI's savers do). Returns the path written."""
    path = str(path)
    if not path.lower().endswith(".safetensors"):
        raise DGError(f"comfy-dg: discriminator files are .safetensors; got '{path}'")
    info = dataclasses.replace(discriminator.info, training={**discriminator.info.training, **(training or {})})
    metadata = {
        "comfy_dg.format": FORMAT_VERSION,
        "comfy_dg.architecture": discriminator.architecture,
        "comfy_dg.config": json.dumps(discriminator.config()),
        "comfy_dg.info": json.dumps(info.to_dict()),
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in discriminator.state_dict().items()}
    if overwrite:
        return save_safetensors(state, path, metadata)
    folder = os.path.dirname(os.path.abspath(path))
    for name in numbered_names(os.path.basename(path), [folder]):
        try:
            return save_safetensors(state, os.path.join(folder, name), metadata, overwrite=False)
        except FileExistsError:
            continue


def open_regular(path):
    """(binary file, size) of `path`, refused unless it is a regular file. Opened without blocking, so that a
    FIFO named like a discriminator cannot hang the queue; everything after reads through this one open, so a
    file replaced meanwhile cannot be checked as one file and loaded as another."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise DiscriminatorFileError(path, "it is a symbolic link to a file that does not exist",
                                         "Fix the link or remove it.") from None
        raise DiscriminatorFileError(path, "no such file", "Put the file in models/discriminators.") from None
    except OSError as e:
        raise DiscriminatorFileError(path, f"it cannot be opened ({e.strerror or e})",
                                     "Check the file's permissions.") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DiscriminatorFileError(path, f"it is {file_kind(st.st_mode)}, not a regular file",
                                     "Put a .safetensors file made by comfy-dg there instead.")
    return os.fdopen(fd, "rb"), st.st_size


def file_digest(path) -> str:
    """SHA-256 of a discriminator file's bytes (a regular file only)."""
    f, _ = open_regular(path)
    h = hashlib.sha256()
    with f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_header(path) -> dict:
    """The safetensors JSON header, read without trusting the sizes it claims."""
    f, size = open_regular(path)
    with f:
        return _read_header(f, size, path)[0]


def _read_header(f, size, path):
    """(header, offset of the data) from the open file `f` of `size` bytes."""
    head = f.read(8)
    if len(head) < 8:
        raise DiscriminatorFileError(path, "the file is shorter than a safetensors header (truncated or empty)",
                                     "Download or save it again.")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise DiscriminatorFileError(path, f"its header claims {n} bytes but the file has {size - 8} after it "
                                     "(not a safetensors file, or truncated)", "Download or save it again.")
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:   # bad UTF-8 or JSON, integers too long to read, deep nesting
        raise DiscriminatorFileError(path, f"its safetensors header is not valid JSON ({e.__class__.__name__})",
                                     "The file is damaged: download or save it again.") from None
    if not isinstance(header, dict):
        raise DiscriminatorFileError(path, "its safetensors header is not a JSON object", "Download or save it again.")
    meta = header.get("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise DiscriminatorFileError(path, "its metadata is not a table of strings, as safetensors requires",
                                     "The file is damaged or was edited: download or save it again.")
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        offs, shape, dtype = entry.get("data_offsets"), entry.get("shape"), entry.get("dtype")
        if not (isinstance(dtype, str) and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)):
            raise DiscriminatorFileError(path, f"tensor '{name}' has a malformed dtype or shape in the header",
                                         "The file is damaged: download or save it again.")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_size):
            raise DiscriminatorFileError(path, f"tensor '{name}' points outside the file (truncated or damaged)",
                                         "Download or save it again.")
    return header, 8 + n


def _check_layout(path, header, data_size):
    """As safetensors writes them, the tensors' byte ranges follow one another and cover the data exactly."""
    ranges = sorted(tuple(e["data_offsets"]) for k, e in header.items() if k != "__metadata__")
    ends = [0] + [end for _, end in ranges]
    if any(start != ends[i] for i, (start, _) in enumerate(ranges)) or ends[-1] != data_size:
        raise DiscriminatorFileError(path, "comfy-dg could not read its tensors (their byte ranges overlap or leave "
                                     "gaps, which safetensors never writes)", "The file is damaged or was edited: "
                                     "download or save it again.")


def _read_tensor(f, path, name, entry, data_start):
    """One tensor, read from the open file at the offsets its (checked) header entry gives."""
    dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
    start, end = entry["data_offsets"]
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - start != need:
        raise DiscriminatorFileError(path, f"comfy-dg could not read its tensors (tensor '{name}' holds {end - start} "
                                     f"bytes but a {entry['dtype']} tensor of shape {shape} needs {need})",
                                     "The file is damaged: download or save it again.")
    f.seek(data_start + start)
    raw = f.read(need)
    if len(raw) != need:
        raise DiscriminatorFileError(path, "the file became shorter while it was read", "Save it again.")
    if need == 0:
        return torch.empty(shape, dtype=dtype)
    # safetensors stores little-endian values: the byte order of every platform ComfyUI runs on
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def _metadata(path, header):
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or "comfy_dg.format" not in meta:
        raise DiscriminatorFileError(path, "it has no comfy-dg metadata (it is some other safetensors file, "
                                     "such as a model or LoRA)",
                                     "Put only discriminators made by comfy-dg in models/discriminators.")
    if meta["comfy_dg.format"] not in READS:
        raise DiscriminatorFileError(path, f"it is in comfy-dg file format {meta['comfy_dg.format']!r}; this "
                                     f"version reads formats {', '.join(READS)}", "Update comfy-dg.")
    arch = meta.get("comfy_dg.architecture")
    if arch not in ARCHITECTURES:
        raise DiscriminatorFileError(path, f"its architecture {arch!r} is unknown (known: {', '.join(ARCHITECTURES)})",
                                     "Update comfy-dg, or re-train the discriminator.")
    try:
        config = json.loads(meta.get("comfy_dg.config", ""))
        info = DiscriminatorInfo.from_dict(json.loads(meta.get("comfy_dg.info", "")))
        if not isinstance(config, dict):
            raise TypeError("config is not an object")
    except (TypeError, ValueError, RecursionError) as e:
        raise DiscriminatorFileError(path, f"its comfy-dg metadata is malformed ({str(e)[:200]})",
                                     "Save or download the file again.") from None
    return arch, config, info


def load_discriminator(path, device="cpu") -> Discriminator:
    """Read a discriminator file, check every tensor against the declared architecture, build it."""
    path = str(path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise DiscriminatorFileError(path, "it is a pickle-based file, and unpickling a file can run any code "
                                     "hidden in it, so comfy-dg never opens those",
                                     "Convert it to .safetensors where it was made (comfy_dg.save_discriminator), "
                                     "or ask its author for the .safetensors version.")
    if not path.lower().endswith(".safetensors"):
        raise DiscriminatorFileError(path, "only .safetensors discriminator files are read",
                                     "Save it as .safetensors.")
    f, size = open_regular(path)
    with f:
        return _load(f, size, path, device)


def _load(f, size, path, device):
    header, data_start = _read_header(f, size, path)
    arch, config, info = _metadata(path, header)
    found = {k: v for k, v in header.items() if k != "__metadata__"}
    for name in BLOCK_COUNTS:
        count = config.get(name)
        if type(count) is int and count > len(found):
            raise DiscriminatorFileError(path, f"its metadata declares {name}={count}, more blocks than the "
                                         f"{len(found)} tensors it holds", "The file is damaged or was edited: "
                                         "re-train or re-save it.")
    with torch.inference_mode(False):   # parameters made here must later be usable by autograd
        try:
            with torch.device("meta"):
                expected = build(arch, info, config).state_dict()
        except (TypeError, ValueError, RuntimeError) as e:
            raise DiscriminatorFileError(path, f"its {arch} hyper-parameters are invalid ({e})",
                                         "Re-train or re-save the discriminator.") from None
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or extra:
            raise DiscriminatorFileError(path, f"its tensors do not match the {arch} architecture it declares "
                                         f"(missing: {missing[:5]}, unexpected: {extra[:5]})",
                                         "The file is damaged or was edited: re-train or re-save it.")
        for k, t in expected.items():
            entry = found[k]
            if entry.get("dtype") not in DTYPES or list(entry.get("shape", [])) != list(t.shape):
                raise DiscriminatorFileError(path, f"tensor '{k}' is {entry.get('dtype')} {entry.get('shape')}, "
                                             f"but the declared {arch} architecture needs a float tensor of shape "
                                             f"{list(t.shape)}", "The file is damaged or was edited: re-train it.")
        _check_layout(path, header, size - data_start)
        state = {k: _read_tensor(f, path, k, found[k], data_start) for k in expected}
        state = {k: v.to(torch.float32) for k, v in state.items()}
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:
            raise DiscriminatorFileError(path, f"tensors {bad[:5]} hold NaN or infinite weights",
                                         "The training diverged or the file is damaged: re-train it.")
        disc = build(arch, info, config)
        disc.load_state_dict(state)
        disc.requires_grad_(False).eval()
        return disc.to(device)
