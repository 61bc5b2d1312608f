"""Prompts as the network's forward receives them: the negative a features head is trained under, and the prompt
the reconstruction objective takes the model's denoiser under."""
import torch

from ..errors import TrainingError
from ..taps import find_tap

# What ComfyUI's samplers turn a CONDITIONING entry into, besides the prompt: these change the forward itself.
_UNSUPPORTED = ("area", "mask", "control", "hooks", "gligen", "start_percent", "end_percent")


def check_negative_architecture(architecture: str):
    """A negative prompt to train under is for the features architecture only (the node and the trainer both
    refuse it otherwise, rather than ignore it)."""
    if architecture != "features":
        raise TrainingError("comfy-dg: a negative prompt to train under is for the features architecture; leave it "
                            "unconnected for a standalone discriminator.")


def negative_conditioning(model_patcher, conditioning, latent_shape):
    """(context (T, C), y (D,) or None) that the model's network gets for `conditioning` (a CONDITIONING with one
    entry) used as the negative prompt, for latents of shape (C, H, W): built by ComfyUI's own sampler code
    (convert_cond + the model's extra_conds), so it equals what the sampler will hand the network."""
    _check_plain(conditioning, "negative prompt", "to train the features head under it")
    base_model = model_patcher.model
    tap = find_tap(base_model.diffusion_model)
    if tap is None or tap.prompt_dims(base_model) is None:
        raise TrainingError("comfy-dg: training under a negative prompt is for UNet models (SD1.x, SD2, SDXL), "
                            "whose features can be taken from the sampler's own forward pass; leave 'negative' "
                            "unconnected to train on prompt-independent features.")
    with torch.inference_mode(False):
        model_conds = _model_conds(base_model, conditioning, latent_shape, "negative")
        if "c_crossattn" not in model_conds or not set(model_conds) <= {"c_crossattn", "y"}:
            raise TrainingError(f"comfy-dg: this model takes {sorted(model_conds)} besides the prompt; training "
                                "under a negative prompt supports text-to-image UNets only.")
        context = model_conds["c_crossattn"].cond[0].detach().float().clone()
        y = model_conds["y"].cond[0].detach().float().clone() if "y" in model_conds else None
    return context, y


def prompt_conds(model_patcher, conditioning, latent_shape):
    """{name: tensor (1, ...)}: the inputs besides x and σ (c_crossattn, y, guidance, ...) that the model's
    apply_model gets for `conditioning` (a CONDITIONING with one entry) used as the positive prompt, for latents
    of shape (C, H, W), built by ComfyUI's own sampler code. The reconstruction objective takes the model's
    denoiser under it."""
    _check_plain(conditioning, "prompt you sample with", "for the reconstruction objective")
    with torch.inference_mode(False):
        out = {}
        for name, cond in _model_conds(model_patcher.model, conditioning, latent_shape, "positive").items():
            value = getattr(cond, "cond", None)
            if not isinstance(value, torch.Tensor) or value.shape[:1] != (1,):
                raise TrainingError(f"comfy-dg: this model takes a '{name}' input the reconstruction objective cannot "
                                    "reproduce in training; use the bce objective.")
            value = value.detach().clone()
            out[name] = value.float() if value.is_floating_point() else value
    return out


def _check_plain(conditioning, role, purpose):
    if not isinstance(conditioning, list) or len(conditioning) != 1:
        raise TrainingError(f"comfy-dg: connect one plain {role} (a CONDITIONING with one entry, e.g. straight from "
                            f"CLIP Text Encode) {purpose}.")
    if any(k in conditioning[0][1] for k in _UNSUPPORTED):
        raise TrainingError(f"comfy-dg: the {role} {purpose} carries an area, mask, ControlNet, hooks or timestep "
                            "range; connect the plain CLIP Text Encode output instead.")


def _model_conds(base_model, conditioning, latent_shape, kind):
    """ComfyUI's own conversion of a one-entry CONDITIONING into the network's extra inputs (model_conds)."""
    import comfy.sampler_helpers
    import comfy.samplers
    noise = torch.zeros(1, *latent_shape)
    conds = comfy.samplers.encode_model_conds(base_model.extra_conds, comfy.sampler_helpers.convert_cond(conditioning),
                                              noise, torch.device("cpu"), kind, latent_image=noise,
                                              denoise_mask=None, seed=0)
    return conds[0]["model_conds"]
