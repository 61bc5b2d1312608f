"""Content fingerprints: a stable digest of what decides a computation's result — tensors by their bytes, networks
by their weights, functions by their code and the values they captured, other objects by their fields — never by an
object's address, so that equal inputs give equal keys in any process and any difference gives another key.

Used for the fake-latent cache key: a sampler's output depends on the model (weights, LoRA and other weight
patches, object patches such as ModelSamplingDiscrete/SD3/Flux, every model option and wrapper) and on the whole
conditioning (timestep ranges, areas, masks, ControlNets, SDXL sizes, Flux guidance, ...)."""
import enum
import functools
import hashlib
import json
import types
import uuid
import weakref

import numpy as np
import torch

SAMPLE = 64                 # values per weight tensor that identify a network cheaply
MAX_DEPTH = 64
MAX_OBJECTS = 200_000       # beyond this, what is reachable is not a sampling setting: no key (nothing cached)
# ModelPatcher fields that change what the model computes; the rest (devices, sizes, backups, uuids, the parent
# it was cloned from) describe where and when it runs, not what.
PATCHER_FIELDS = ("patches", "object_patches", "weight_wrapper_patches", "model_options", "attachments",
                  "additional_models", "callbacks", "wrappers", "injections", "hook_patches", "hook_mode",
                  "force_cast_weights")
# What a ModelPatcher writes on the networks it manages and their layers (load state, devices, memory, casting
# and patch hooks): not what they compute.
PATCHER_MARKS = ("current_patcher", "current_weight_patches_uuid", "device", "dynamic_patchers", "dynamic_pins",
                 "dynamic_vbars", "lowvram_patch_counter", "model_loaded_weight_memory", "model_lowvram",
                 "model_offload_buffer_memory", "skip_injection", "weight_function", "bias_function", "seed_key")
PLAIN = (type(None), bool, int, float, str, enum.Enum, torch.dtype)


def type_path(t) -> str:
    return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', getattr(t, '__name__', '?'))}"


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (any dtype), with its shape and dtype."""
    t = t.detach()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    if t.device.type == "meta":
        return h.hexdigest()
    try:
        data = t.cpu().contiguous().reshape(-1).view(torch.uint8)
    except (RuntimeError, TypeError):        # tensor subclasses (quantized weights) without a byte view
        data = t.float().cpu().contiguous().reshape(-1).view(torch.uint8)
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def weights_sample(name, t: torch.Tensor):
    """A weight's cheap identity: its name, shape, dtype and first values."""
    t = t.detach()
    values = [] if t.device.type == "meta" else t.reshape(-1)[:SAMPLE].float().cpu().tolist()
    return [name, list(t.shape), str(t.dtype), [repr(v) for v in values]]


def module_weights(module: torch.nn.Module, originals=None, prefix=""):
    """Every weight of `module` by its cheap identity; `originals` maps 'prefix + name' to the unpatched weight
    where a ModelPatcher has patched it in place (LoRA), so the identity does not depend on which clone of a
    model was loaded last."""
    out = []
    for name, p in module.state_dict(keep_vars=True).items():
        backup = (originals or {}).get(prefix + name)
        out.append(weights_sample(name, getattr(backup, "weight", backup) if backup is not None else p))
    return out


class TooLarge(Exception):
    pass


class _Walker:
    def __init__(self):
        self.seen = {}
        self.alive = []         # every object numbered stays alive, so that no later object reuses its id

    def __call__(self, obj, depth=0):
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return ["float", repr(obj)]          # NaN and infinities too
        if isinstance(obj, (bytes, bytearray)):
            return ["bytes", hashlib.sha256(bytes(obj)).hexdigest()]
        if isinstance(obj, (torch.dtype, torch.device, torch.Size)):
            return ["torch", str(obj)]
        if isinstance(obj, enum.Enum):
            return ["enum", type_path(type(obj)), obj.name]
        if isinstance(obj, type):
            return ["type", type_path(obj)]
        if isinstance(obj, (uuid.UUID, weakref.ref)):
            return [type_path(type(obj))]       # identities, not content
        if isinstance(obj, types.ModuleType):
            return ["module", obj.__name__]
        if depth > MAX_DEPTH:
            return ["deep", type_path(type(obj))]
        if id(obj) in self.seen:                 # shared objects and cycles: the first visit's number
            return ["ref", self.seen[id(obj)]]
        self.seen[id(obj)] = len(self.seen)
        self.alive.append(obj)
        if len(self.alive) > MAX_OBJECTS:
            raise TooLarge(type_path(type(obj)))
        d = depth + 1
        if isinstance(obj, torch.Tensor):
            return ["tensor", tensor_digest(obj)]
        if isinstance(obj, np.ndarray):
            return ["ndarray", str(obj.dtype), list(obj.shape), hashlib.sha256(obj.tobytes()).hexdigest()]
        if isinstance(obj, (list, tuple)):
            return [type(obj).__name__, [self(x, d) for x in obj]]
        if isinstance(obj, (set, frozenset)):
            return ["set", sorted((self(x, d) for x in obj), key=_json)]
        if isinstance(obj, dict):
            items = [[self(k, d), self(v, d)] for k, v in obj.items()]
            return ["dict", sorted(items, key=lambda kv: _json(kv[0]))]
        if _is_patcher(obj):
            return self.patcher(obj, d)
        if isinstance(obj, torch.nn.Module):
            return self.module(obj, d)
        if isinstance(obj, functools.partial):
            return ["partial", self(obj.func, d), self(obj.args, d), self(obj.keywords, d)]
        if isinstance(obj, types.MethodType):
            return ["method", self(obj.__func__, d), self(obj.__self__, d)]
        if isinstance(obj, types.FunctionType):
            cells = [c.cell_contents if _cell_full(c) else ["empty"] for c in (obj.__closure__ or ())]
            return ["function", type_path(obj), self(obj.__code__, d), self(cells, d), self(obj.__defaults__, d),
                    self(obj.__kwdefaults__, d)]
        if isinstance(obj, types.CodeType):
            return ["code", hashlib.sha256(obj.co_code).hexdigest(), self(obj.co_consts, d), list(obj.co_names)]
        if isinstance(obj, (types.BuiltinFunctionType, types.MethodWrapperType, types.WrapperDescriptorType)):
            return ["builtin", getattr(obj, "__qualname__", repr(type(obj)))]
        fields = {}
        if hasattr(obj, "__dict__"):
            fields.update(vars(obj))
        for slot in getattr(type(obj), "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                fields[slot] = getattr(obj, slot)
        return ["object", type_path(type(obj)), self(fields, d)]

    def module(self, m: torch.nn.Module, d):
        """A network: its class (and bases: ModelSamplingDiscrete's prediction type is a base class), its plain
        attributes (shift, multiplier, sigma_data, kernel sizes, ...), its children, and its own weights' cheap
        identity."""
        attrs = {k: v for k, v in vars(m).items()
                 if not k.startswith(("_", "comfy_", "prev_comfy_")) and k != "training" and k not in PATCHER_MARKS
                 and (isinstance(v, PLAIN) or (isinstance(v, tuple) and all(isinstance(x, PLAIN) for x in v)))}
        own = [weights_sample(n, t) for n, t in list(m._parameters.items()) + list(m._buffers.items()) if t is not None]
        return ["nn", [type_path(t) for t in type(m).__mro__], self(attrs, d), own,
                [[n, self(c, d)] for n, c in m._modules.items()]]

    def patcher(self, p, d):
        """A ModelPatcher: the diffusion model with its unpatched weights and model sampling, and every patch."""
        model = p.model
        backup = getattr(p, "backup", None) or {}
        object_backup = getattr(p, "object_patches_backup", None) or {}
        if hasattr(model, "diffusion_model"):
            sampling = object_backup.get("model_sampling", getattr(model, "model_sampling", None))
            config = getattr(model, "model_config", None)
            base = ["base_model", type_path(type(model)), self(getattr(model, "model_type", None), d),
                    self(getattr(config, "unet_config", None), d),
                    self(getattr(model, "latent_format", None), d), self(sampling, d),
                    type_path(type(model.diffusion_model)),
                    module_weights(model.diffusion_model, backup, "diffusion_model.")]
        else:
            base = ["model", [type_path(t) for t in type(model).__mro__], module_weights(model, backup)]
        return ["patcher", base, [[f, self(getattr(p, f, None), d)] for f in PATCHER_FIELDS]]


def _is_patcher(obj) -> bool:
    return all(hasattr(obj, a) for a in ("model", "patches", "object_patches", "model_options", "load_device"))


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def _json(x) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"))


def content_digest(*objs) -> str | None:
    """One stable hex digest of `objs`' content, or None when they reach too many objects to be settings."""
    try:
        walked = _Walker()(list(objs))
    except (TooLarge, RecursionError):
        return None
    return hashlib.sha256(_json(walked).encode()).hexdigest()[:32]
