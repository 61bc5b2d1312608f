"""Small real ComfyUI models (ComfyUI's own UNet and model classes, tiny configs) for tests, benchmarks and the
demo. No weights are downloaded: they are initialised here, reproducibly from a seed."""
import torch

MODEL_TYPES = ("EPS", "V_PREDICTION", "FLOW", "EDM")


def tiny_unet_config(model_channels=32, channel_mult=(1, 2), context_dim=32, in_channels=4, adm_in_channels=None):
    levels = len(channel_mult)
    return {
        "use_checkpoint": False, "image_size": 32, "in_channels": in_channels, "out_channels": in_channels,
        "model_channels": model_channels, "num_res_blocks": [1] * levels, "channel_mult": list(channel_mult),
        "transformer_depth": [1] * levels, "transformer_depth_output": [1] * (2 * levels),
        "transformer_depth_middle": 1, "context_dim": context_dim,
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


def tiny_model(model_type: str = "EPS", seed: int = 0, family: str = "SD15", state_dict=None,
               dtype=torch.float32, **unet_kwargs):
    """A ModelPatcher around a real comfy.model_base.BaseModel with ComfyUI's SD1.5 UNet at a tiny size.

    family picks the latent format ("SD15": 4 channels; "SDXL": 4 channels and a pooled `y` input;
    "Flux"/"SD3": 16 channels), so that fit checks between models and discriminators are real.
    """
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    channels = 16 if family in ("Flux", "SD3") else 4
    cfg = tiny_unet_config(in_channels=channels, adm_in_channels=32 if family == "SDXL" else None, **unet_kwargs)

    class TinyConfig(comfy.supported_models.SD15):
        unet_config = {}
        unet_extra_config = {}
        latent_format = getattr(comfy.latent_formats, family)
        sampling_settings = {"shift": 3.0} if model_type == "FLOW" else {}

    _PooledVectorModel = _pooled_vector_model()
    with torch.inference_mode(False):
        config = TinyConfig(cfg)
        config.set_inference_dtype(dtype, None)
        mt = getattr(comfy.model_base.ModelType, model_type)
        model = _PooledVectorModel(config, model_type=mt, device="cpu")
        if state_dict is None:
            _init_weights(model.diffusion_model, seed)
        else:
            model.diffusion_model.load_state_dict(state_dict)
        model.diffusion_model.to(dtype)
        model.eval()
    load = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=torch.device("cpu"))


def empty_conditioning(model_patcher, batch: int = 1, tokens: int = 1):
    """Positive/negative CONDITIONING for a tiny model: context vectors of its context_dim."""
    cfg = model_patcher.model.model_config.unet_config
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(1, tokens, cfg["context_dim"], generator=g)
    extra = {}
    if cfg.get("adm_in_channels"):
        extra = {"pooled_output": torch.zeros(1, cfg["adm_in_channels"])}
    return [[pos, dict(extra)]], [[torch.zeros_like(pos), dict(extra)]]
