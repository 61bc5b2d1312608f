"""Full-size ComfyUI networks with random weights, for speed and memory benchmarks: real comfy.model_base models
whose configs are what comfy.model_detection finds in the released checkpoints. No weights are downloaded."""
import torch

# comfy.model_detection's unet_config for the SD1.5 and SDXL base checkpoints.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def unet_model(name: str, dtype=torch.float32, device="cpu", seed=None):
    """A ModelPatcher around comfy.model_base.BaseModel (sd15) or SDXL (sdxl) with the full-size UNet on `device`
    ("meta": shapes only, no memory). With a seed its weights are random from it (ordinary tensors); without, they
    are left uninitialised inference tensors, as ComfyUI's loader makes them before it loads a checkpoint's."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    base, cls, unet = {"sd15": (comfy.supported_models.SD15, comfy.model_base.BaseModel, SD15_UNET),
                       "sdxl": (comfy.supported_models.SDXL, comfy.model_base.SDXL, SDXL_UNET)}[name]

    class Config(base):
        unet_config = {}
        unet_extra_config = {}

    with torch.inference_mode(seed is None):
        config = Config({**unet, "dtype": dtype})
        config.set_inference_dtype(dtype, None)
        model = cls(config, device=device)
        if seed is not None:
            from harness.tiny import _init_weights
            _init_weights(model.diffusion_model, seed)
            model.diffusion_model.to(dtype)
        model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device("cpu"))
