"""Test-only ComfyUI nodes: a tiny real model (ComfyUI's SD1.5 UNet at a tiny size) with its conditioning,
since no checkpoint can be downloaded here. Loaded by the server tests from their own custom_nodes folder."""
import os
import sys

REPO = os.environ["COMFY_DG_REPO"]
if REPO not in sys.path:
    sys.path.append(REPO)

from comfy_dg.tiny import MODEL_TYPES, empty_conditioning, tiny_model, tiny_vae  # noqa: E402


class DGTestTinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "model_type": (list(MODEL_TYPES),),
                             "family": (["SD15", "SDXL", "Flux"],)}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed, model_type, family):
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
