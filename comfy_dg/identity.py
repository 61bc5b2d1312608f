"""Names the pack owns for model families and networks, mapped from ComfyUI's classes here and nowhere else.

Discriminator files store these names, never ComfyUI's class names directly, so an upstream rename means one new
line below, and every file written so far keeps loading. A class not listed keeps its own name (new model types
work at once; list them here when they are renamed).
"""

# Model family: the latent space a discriminator is trained in, from ComfyUI's latent format class.
FAMILIES = {
    "SD15": "SD15", "SDXL": "SDXL", "SD3": "SD3", "Flux": "Flux", "Flux2": "Flux2",
    "Digits": "Digits",     # the pack's demo model (comfy_dg.small_models)
}

# Network: the architecture a features head reads, from the diffusion network's class (module path under
# comfy.ldm, then class: AuraFlow has an MMDiT class of its own).
NETWORKS = {
    "modules.diffusionmodules.openaimodel.UNetModel": "unet",
    "flux.model.Flux": "flux",
    "modules.diffusionmodules.mmdit.MMDiT": "mmdit",
    "modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper": "mmdit",
}
# Files of format 1 stored the network's bare class name (only these had taps then).
LEGACY_NETWORKS = {"UNetModel": "unet", "Flux": "flux", "MMDiT": "mmdit", "OpenAISignatureMMDITWrapper": "mmdit"}


def family(base_model) -> str:
    """The family of a comfy.model_base model (its latent space)."""
    name = type(base_model.latent_format).__name__
    return FAMILIES.get(name, name)


def latent_channels(base_model) -> int:
    return int(base_model.latent_format.latent_channels)


def network(diffusion_model) -> str:
    """The network name of a diffusion network (base_model.diffusion_model)."""
    cls = type(diffusion_model)
    key = f"{cls.__module__.removeprefix('comfy.ldm.')}.{cls.__name__}"
    return NETWORKS.get(key, key)
