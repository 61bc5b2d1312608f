"""The conditioning a features head is trained under: a negative prompt as the network's forward receives it."""
import torch

from ..errors import TrainingError
from ..taps import find_tap
from .loop import NEGATIVE_NEEDS_FEATURES

# What ComfyUI's samplers turn a CONDITIONING entry into, besides the prompt: these change the forward itself.
_UNSUPPORTED = ("area", "mask", "control", "hooks", "gligen", "start_percent", "end_percent")


def check_negative_architecture(architecture: str):
    """A negative prompt to train under is for the features architecture only (the node and the command line
    both refuse it otherwise, rather than ignore it)."""
    if architecture != "features":
        raise TrainingError(NEGATIVE_NEEDS_FEATURES)


def negative_conditioning(model_patcher, conditioning, latent_shape):
    """(context (T, C), y (D,) or None) that the model's network gets for `conditioning` (a CONDITIONING with one
    entry) used as the negative prompt, for latents of shape (C, H, W): built by ComfyUI's own sampler code
    (convert_cond + the model's extra_conds), so it equals what the sampler will hand the network."""
    import comfy.sampler_helpers
    import comfy.samplers

    if not isinstance(conditioning, list) or len(conditioning) != 1:
        raise TrainingError("comfy-dg: connect one plain negative prompt (a CONDITIONING with one entry, e.g. "
                            "straight from CLIP Text Encode) to train the features head under it.")
    if any(k in conditioning[0][1] for k in _UNSUPPORTED):
        raise TrainingError("comfy-dg: the negative prompt to train under carries an area, mask, ControlNet, hooks "
                            "or timestep range; connect the plain CLIP Text Encode output instead.")
    base_model = model_patcher.model
    tap = find_tap(base_model.diffusion_model)
    if tap is None or tap.prompt_dims(base_model) is None:
        raise TrainingError("comfy-dg: training under a negative prompt is for UNet models (SD1.x, SD2, SDXL), "
                            "whose features can be taken from the sampler's own forward pass; leave 'negative' "
                            "unconnected to train on prompt-independent features.")
    with torch.inference_mode(False):
        noise = torch.zeros(1, *latent_shape)
        conds = comfy.samplers.encode_model_conds(base_model.extra_conds, comfy.sampler_helpers.convert_cond(conditioning),
                                                  noise, torch.device("cpu"), "negative", latent_image=noise,
                                                  denoise_mask=None, seed=0)
        model_conds = conds[0]["model_conds"]
        if "c_crossattn" not in model_conds or not set(model_conds) <= {"c_crossattn", "y"}:
            raise TrainingError(f"comfy-dg: this model takes {sorted(model_conds)} besides the prompt; training "
                                "under a negative prompt supports text-to-image UNets only.")
        context = model_conds["c_crossattn"].cond[0].detach().float().clone()
        y = model_conds["y"].cond[0].detach().float().clone() if "y" in model_conds else None
    return context, y
