"""Test-only ComfyUI nodes: a tiny real model (ComfyUI's SD1.5 UNet at a tiny size) with its conditioning,
since no checkpoint can be downloaded here. Loaded by the server tests from their own custom_nodes folder."""
import os
import sys

REPO = os.environ["COMFY_DG_REPO"]
if REPO not in sys.path:
    sys.path.append(REPO)

from harness.tiny import MODEL_TYPES, empty_conditioning, tiny_model, tiny_vae  # noqa: E402


class DGTestTinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "model_type": (list(MODEL_TYPES),),
                             "family": (["SD15", "SDXL", "Flux"],)},
                "optional": {"nonce": ("INT", {"default": 0})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed, model_type, family, nonce=0):
        # nonce: unused, so that a graph can rebuild the very same model as a new object
        m = tiny_model(model_type, seed=seed, family=family)
        pos, neg = empty_conditioning(m)
        return (m, pos, neg)


class DGTestTinyVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed):
        return (tiny_vae(seed=seed),)


NODE_CLASS_MAPPINGS = {"DGTestTinyModel": DGTestTinyModel, "DGTestTinyVAE": DGTestTinyVAE}


class DGTestFastModel:
    """The tiny model without attention blocks (much faster): for load tests with many prompts."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}, "optional": {"nonce": ("INT", {"default": 0})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed, nonce=0):
        m = tiny_model("EPS", seed=seed, attention=False)
        pos, neg = empty_conditioning(m)
        return (m, pos, neg)


def _live(class_names):
    import gc
    return [o for o in gc.get_objects() if type(o).__name__ in class_names]


class DGTestMemoryReport:
    """Reports the server process's memory and what the pack left alive: discriminator modules and their tensors,
    guidance patches, patched models. Runs gc first; `trim` also hands freed heap memory back to the system
    (malloc_trim), so that RSS shows what is held rather than what the allocator keeps for reuse. `reset_peak`
    restarts the kernel's peak-RSS count (VmHWM) after reporting."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("INT", {"default": 0}), "trim": ("BOOLEAN", {"default": True})},
                "optional": {"after": ("LATENT",), "reset_peak": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def report(self, nonce, trim, after=None, reset_peak=False):
        import ctypes
        import gc
        import comfy.model_management
        gc.collect()
        if trim:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
        discs = _live({"StandaloneDiscriminator", "FeatureHeadDiscriminator"})
        tensors = sum(len(list(d.parameters())) + len(list(d.buffers())) for d in discs)
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        facts = {"nonce": nonce, "rss_kb": int(status["VmRSS"].split()[0]), "hwm_kb": int(status["VmHWM"].split()[0]),
                 "discriminators": len(discs), "discriminator_tensors": tensors,
                 "guidance_patches": len(_live({"GuidancePatch"})),
                 "loaded_models": len(comfy.model_management.current_loaded_models)}
        del discs
        if reset_peak:       # VmHWM starts again from the current RSS: the next report's hwm_kb is the peak since
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        import json
        return {"ui": {"report": [json.dumps(facts)]}}


NODE_CLASS_MAPPINGS.update({"DGTestFastModel": DGTestFastModel, "DGTestMemoryReport": DGTestMemoryReport})


class DGTestTinyControlNet:
    """A real ComfyUI ControlNet (comfy.cldm.cldm.ControlNet in comfy.controlnet.ControlNet) sized for the tiny
    SD1.5-architecture model, weights from `seed`: for core's Apply ControlNet node."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed):
        import torch
        import comfy.cldm.cldm
        import comfy.controlnet
        import comfy.model_management
        from harness.tiny import _init_weights, tiny_unet_config
        config = {k: v for k, v in tiny_unet_config(attention=False).items() if k not in ("out_channels",)}
        with torch.inference_mode(False):
            net = comfy.cldm.cldm.ControlNet(hint_channels=3, **config)
            _init_weights(net, seed)
        return (comfy.controlnet.ControlNet(net, load_device=comfy.model_management.get_torch_device()),)


class DGTestSetCondValue:
    """Sets one numeric entry of every conditioning's options, as nodes such as CLIP Text Encode (SDXL) set width,
    height and crops (the tiny models have no text encoder)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "key": ("STRING", {"default": "width"}),
                             "value": ("INT", {"default": 1024})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "set"
    CATEGORY = "testing"

    def set(self, conditioning, key, value):
        import node_helpers
        return (node_helpers.conditioning_set_values(conditioning, {key: value}),)


NODE_CLASS_MAPPINGS.update({"DGTestTinyControlNet": DGTestTinyControlNet, "DGTestSetCondValue": DGTestSetCondValue})
