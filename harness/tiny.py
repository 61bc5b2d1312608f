"""Tiny real ComfyUI models (ComfyUI's own networks and model classes at small configs) for tests and benchmarks.
No weights are downloaded: they are initialised here, reproducibly from a seed. They are built and saved with the
runtime's small-model format (comfy_dg.small_models), which the demo's model uses too."""
import torch

from comfy_dg import small_models

MODEL_TYPES = ("EPS", "V_PREDICTION", "FLOW", "EDM")


def tiny_unet_config(model_channels=32, channel_mult=(1, 2), context_dim=32, in_channels=4, adm_in_channels=None,
                     attention=True, num_res_blocks=1):
    """attention=False: a UNet of ResBlocks only (no transformers; the prompt is then ignored), much faster."""
    levels = len(channel_mult)
    depth = 1 if attention else 0
    return {
        "use_checkpoint": False, "image_size": 32, "in_channels": in_channels, "out_channels": in_channels,
        "model_channels": model_channels, "num_res_blocks": [num_res_blocks] * levels,
        "channel_mult": list(channel_mult), "transformer_depth": [depth] * levels,
        "transformer_depth_output": [depth] * ((num_res_blocks + 1) * levels),
        "transformer_depth_middle": 1 if attention else -1, "context_dim": context_dim,
        "use_linear_in_transformer": False, "adm_in_channels": adm_in_channels,
        "num_classes": "sequential" if adm_in_channels else None, "use_spatial_transformer": True, "legacy": False,
        "use_temporal_attention": False, "use_temporal_resblock": False,
        "num_head_channels": -1, "num_heads": 4, "dims": 2,
    }


def _init_weights(module: torch.nn.Module, seed: int):
    # comfy.ops layers leave their weights uninitialised; give them a reproducible start.
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.data.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        elif name.endswith("weight"):
            p.data.fill_(1.0)
        else:
            p.data.zero_()


def _built(spec, state_dict, init, seed, dtype):
    """small_models.build(spec), its weights loaded or initialised from `seed`."""
    patcher = small_models.build(spec, dtype)
    with torch.inference_mode(False):
        dm = patcher.model.diffusion_model
        if state_dict is None:
            init(dm, seed)
        else:
            dm.load_state_dict(state_dict)
        dm.to(dtype)
    return patcher


def tiny_model(model_type: str = "EPS", seed: int = 0, family: str = "SD15", state_dict=None,
               dtype=torch.float32, **unet_kwargs):
    """A ModelPatcher around a real comfy.model_base.BaseModel with ComfyUI's SD1.5 UNet at a tiny size.

    family picks the latent format ("SD15": 4 channels; "SDXL": 4 channels and a pooled `y` input;
    "Flux"/"SD3": 16 channels; "Digits": the demo's 1-channel pixels), so that fit checks between models and
    discriminators are real.
    """
    channels = {"Flux": 16, "SD3": 16, "Digits": 1}.get(family, 4)
    spec = {"arch": "unet", "model_type": model_type, "latent_format": family,
            "config": tiny_unet_config(in_channels=channels, adm_in_channels=32 if family == "SDXL" else None,
                                       **unet_kwargs)}
    if model_type == "FLOW":
        spec["shift"] = 3.0
    return _built(spec, state_dict, _init_weights, seed, dtype)


def _init_transformer_weights(module: torch.nn.Module, seed: int):
    """_init_weights, then what a transformer needs besides: RMSNorm scales at 1 (_init_weights would zero
    them: `scale` is not named `weight`) and MMDiT's fixed positional-embedding buffer (left uninitialised)."""
    _init_weights(module, seed)
    for name, p in module.named_parameters():
        if p.ndim == 1 and name.endswith("scale"):
            p.data.fill_(1.0)
    pos_embed = getattr(module, "pos_embed", None)
    if isinstance(pos_embed, torch.Tensor):
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch
        side = module.pos_embed_max_size
        pos_embed.copy_(get_2d_sincos_pos_embed_torch(module.hidden_size, side, side).reshape(pos_embed.shape))


def tiny_flux_config(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=32, vec_in_dim=32,
                     guidance_embed=True):
    import dataclasses
    from comfy.ldm.flux.model import FluxParams

    head = hidden_size // num_heads
    axes = [head - 2 * (3 * head // 8), 3 * head // 8, 3 * head // 8]     # RoPE axes (index, row, column)
    config = {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": vec_in_dim,
        "context_in_dim": context_in_dim, "hidden_size": hidden_size, "mlp_ratio": 4.0, "num_heads": num_heads,
        "depth": depth, "depth_single_blocks": depth_single_blocks, "axes_dim": axes, "theta": 10000,
        "patch_size": 2, "qkv_bias": True, "guidance_embed": guidance_embed,
    }
    # Newer ComfyUI's FluxParams also say which text-token position axes carry ids: none for Flux.1, as its
    # checkpoint detection sets (older ones have no such field).
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        config["txt_ids_dims"] = []
    return config


def tiny_flux(seed: int = 0, state_dict=None, dtype=torch.float32):
    """A ModelPatcher around a real comfy.model_base.Flux (Flux.1-dev layout: guidance-distilled, pooled
    vector input, patch size 2, 16 latent channels) at a tiny size: hidden 64, 2 heads, 2 double + 2 single
    blocks, 32-wide text context and pooled vector."""
    return _built({"arch": "flux", "config": tiny_flux_config()}, state_dict, _init_transformer_weights, seed, dtype)


def tiny_sd3_config(depth=3, context_in_features=32, adm_in_channels=32, pos_embed_max_size=16):
    hidden = 64 * depth     # MMDiT's own rule: hidden = 64·depth, depth heads of 64
    return {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
        "adm_in_channels": adm_in_channels,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": context_in_features, "out_features": hidden}},
        "num_patches": pos_embed_max_size ** 2, "pos_embed_max_size": pos_embed_max_size,
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
    }


def tiny_sd3(seed: int = 0, state_dict=None, dtype=torch.float32):
    """A ModelPatcher around a real comfy.model_base.SD3 (MMDiT, as detected from an SD3 checkpoint:
    pooled `y` input, text-context embedder, cropped positional embedding) at a tiny size: depth 3 (MMDiT makes
    that hidden 192 with 3 heads, and 3 joint blocks, so the middle one, index 1, has a block after it), 32-wide
    context and pooled vector, latents up to 32×32."""
    return _built({"arch": "sd3", "config": tiny_sd3_config()}, state_dict, _init_transformer_weights, seed, dtype)


def _context_and_pooled_dims(unet_config):
    """(text-context width, pooled-vector width or None) of a UNet, Flux or MMDiT config."""
    context = unet_config.get("context_dim") or unet_config.get("context_in_dim") \
        or ((unet_config.get("context_embedder_config") or {}).get("params") or {}).get("in_features")
    if not context:
        raise ValueError("comfy-dg: this model's config names no text-context width")
    return int(context), unet_config.get("adm_in_channels") or unet_config.get("vec_in_dim")


def empty_conditioning(model_patcher, batch: int = 1, tokens: int = 1):
    """Positive/negative CONDITIONING for a tiny model: context vectors of its context width (UNet
    context_dim, Flux context_in_dim, MMDiT context_embedder in_features) and, where the model takes one, a zero
    pooled_output of its vector width (SDXL-style adm_in_channels, Flux vec_in_dim, SD3 adm_in_channels).
    Flux's guidance comes from ComfyUI's default (3.5) as for a conditioning without a FluxGuidance node."""
    context_dim, pooled_dim = _context_and_pooled_dims(model_patcher.model.model_config.unet_config)
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(1, tokens, context_dim, generator=g)
    extra = {}
    if pooled_dim:
        extra = {"pooled_output": torch.zeros(1, pooled_dim)}
    return [[pos, dict(extra)]], [[torch.zeros_like(pos), dict(extra)]]


def tiny_vae(seed: int = 0, latent_channels: int = 4):
    """A real ComfyUI VAE (comfy.sd.VAE around ComfyUI's AutoencoderKL) at a tiny size: 8× downscale,
    32 channels; weights initialised from `seed`. It encodes deterministically (the posterior mode)."""
    vae = small_models.build_vae({"double_z": True, "z_channels": latent_channels, "resolution": 64, "in_channels": 3,
                                  "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                  "attn_resolutions": [], "dropout": 0.0})
    with torch.inference_mode(False):
        _init_weights(vae.first_stage_model, seed)
    return vae
