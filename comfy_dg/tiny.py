"""Small real ComfyUI models (ComfyUI's own UNet and model classes, tiny configs) for tests, benchmarks and the
demo. No weights are downloaded: they are initialised here, reproducibly from a seed."""
import torch

MODEL_TYPES = ("EPS", "V_PREDICTION", "FLOW", "EDM")


def digits_latent_format():
    """A pixel-space "latent" for 8×8 grayscale images in [-1, 1]: one channel, no scaling. ComfyUI names a
    model's family by its latent format's class, so this one is "Digits"."""
    import comfy.latent_formats

    class Digits(comfy.latent_formats.LatentFormat):
        latent_channels = 1
        latent_dimensions = 2
        scale_factor = 1.0
    return Digits


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
        "num_head_channels": -1, "num_heads": 4, "dims": 2, "dtype": torch.float32,
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


def _pooled_vector_model():
    import comfy.model_base

    class PooledVectorModel(comfy.model_base.BaseModel):
        """Feeds the conditioning's pooled_output to the UNet as its `y` vector, as SDXL does (without
        SDXL's size embeddings), when the config asks for one."""

        def encode_adm(self, **kwargs):
            if not self.model_config.unet_config.get("adm_in_channels"):
                return None
            return kwargs.get("pooled_output")
    return PooledVectorModel


def _patcher(model, state_dict, init, seed, dtype, spec):
    """Weights (initialised from `seed`, or loaded) in `dtype`, and a ModelPatcher that remembers the spec."""
    import comfy.model_management
    import comfy.model_patcher
    with torch.inference_mode(False):
        if state_dict is None:
            init(model.diffusion_model, seed)
        else:
            model.diffusion_model.load_state_dict(state_dict)
        model.diffusion_model.to(dtype)
        model.eval()
    load = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=torch.device("cpu"))
    patcher.tiny_spec = spec
    return patcher


def tiny_model(model_type: str = "EPS", seed: int = 0, family: str = "SD15", state_dict=None,
               dtype=torch.float32, **unet_kwargs):
    """A ModelPatcher around a real comfy.model_base.BaseModel with ComfyUI's SD1.5 UNet at a tiny size.

    family picks the latent format ("SD15": 4 channels; "SDXL": 4 channels and a pooled `y` input;
    "Flux"/"SD3": 16 channels), so that fit checks between models and discriminators are real.
    """
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models

    channels = {"Flux": 16, "SD3": 16, "Digits": 1}.get(family, 4)
    cfg = tiny_unet_config(in_channels=channels, adm_in_channels=32 if family == "SDXL" else None, **unet_kwargs)

    class TinyConfig(comfy.supported_models.SD15):
        unet_config = {}
        unet_extra_config = {}
        latent_format = digits_latent_format() if family == "Digits" else getattr(comfy.latent_formats, family)
        sampling_settings = {"shift": 3.0} if model_type == "FLOW" else {}

    _PooledVectorModel = _pooled_vector_model()
    with torch.inference_mode(False):
        config = TinyConfig(cfg)
        config.set_inference_dtype(dtype, None)
        mt = getattr(comfy.model_base.ModelType, model_type)
        model = _PooledVectorModel(config, model_type=mt, device="cpu")
    return _patcher(model, state_dict, _init_weights, seed, dtype,
                    {"model_type": model_type, "family": family, **unet_kwargs})


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


def _tiny_patcher(model_class, config_class, unet_config, seed, state_dict, dtype, spec):
    with torch.inference_mode(False):
        config = config_class(unet_config)
        config.set_inference_dtype(dtype, None)
        model = model_class(config, device="cpu")
    return _patcher(model, state_dict, _init_transformer_weights, seed, dtype, spec)


def tiny_flux_config(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=32, vec_in_dim=32,
                     guidance_embed=True):
    head = hidden_size // num_heads
    axes = [head - 2 * (3 * head // 8), 3 * head // 8, 3 * head // 8]     # RoPE axes (index, row, column)
    return {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": vec_in_dim,
        "context_in_dim": context_in_dim, "hidden_size": hidden_size, "mlp_ratio": 4.0, "num_heads": num_heads,
        "depth": depth, "depth_single_blocks": depth_single_blocks, "axes_dim": axes, "theta": 10000,
        "patch_size": 2, "qkv_bias": True, "guidance_embed": guidance_embed,
    }


def tiny_flux(seed: int = 0, state_dict=None, dtype=torch.float32):
    """A ModelPatcher around a real comfy.model_base.Flux (Flux.1-dev layout: guidance-distilled, pooled
    vector input, patch size 2, 16 latent channels) at a tiny size: hidden 64, 2 heads, 2 double + 2 single
    blocks, 32-wide text context and pooled vector."""
    import comfy.model_base
    import comfy.supported_models

    class TinyFlux(comfy.supported_models.Flux):
        unet_config = {}
        unet_extra_config = {}

    return _tiny_patcher(comfy.model_base.Flux, TinyFlux, tiny_flux_config(), seed, state_dict, dtype,
                         {"arch": "flux"})


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
    import comfy.model_base
    import comfy.supported_models

    class TinySD3(comfy.supported_models.SD3):
        unet_config = {}
        unet_extra_config = {}

    return _tiny_patcher(comfy.model_base.SD3, TinySD3, tiny_sd3_config(), seed, state_dict, dtype, {"arch": "sd3"})


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
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": latent_channels, "resolution": 64, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"embed_dim": latent_channels, "ddconfig": ddconfig}}
    with torch.inference_mode(False):
        ae = AutoencoderKL(**config["params"])
        _init_weights(ae, seed)
        sd = {k: v.detach().clone() for k, v in ae.state_dict().items()}
    vae = comfy.sd.VAE(sd=sd, config=config)
    vae.latent_channels = latent_channels     # comfy.sd.VAE assumes 4 for a VAE given by its config
    return vae


TINY_KEY = "comfy_dg.tiny_checkpoint"


def save_tiny_checkpoint(model_patcher, vae, path):
    """A small model and its VAE (None for a pixel-space model) in one .safetensors file, described by its
    metadata (no pickle)."""
    import json
    from .atomic import save_safetensors
    sd = {f"model.{k}": v.detach().float().cpu().contiguous()
          for k, v in model_patcher.model.diffusion_model.state_dict().items()}
    if vae is not None:
        sd.update({f"vae.{k}": v.detach().float().cpu().contiguous()
                   for k, v in vae.first_stage_model.state_dict().items()})
    meta = {TINY_KEY: json.dumps({"spec": model_patcher.tiny_spec,
                                  "vae_latent_channels": None if vae is None else int(vae.latent_channels)})}
    save_safetensors(sd, str(path), meta)


def is_tiny_checkpoint(path) -> bool:
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return TINY_KEY in (f.metadata() or {})
    except Exception:
        return False


def load_tiny_checkpoint(path):
    """(ModelPatcher, VAE or None) from a file written by save_tiny_checkpoint."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        facts = json.loads(f.metadata()[TINY_KEY])
    sd = load_file(str(path))
    model_sd = {k[6:]: v for k, v in sd.items() if k.startswith("model.")}
    vae_sd = {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}
    spec = dict(facts["spec"])
    builder = {"unet": tiny_model, "flux": tiny_flux, "sd3": tiny_sd3}[spec.pop("arch", "unet")]
    model = builder(state_dict=model_sd, **spec)
    if facts.get("vae_latent_channels") is None:
        return model, None
    vae = tiny_vae(latent_channels=facts["vae_latent_channels"])
    with torch.inference_mode(False):
        vae.first_stage_model.load_state_dict(vae_sd)
    return model, vae
