"""Full-size ComfyUI networks with random weights, for speed and memory benchmarks: real comfy.model_base models
whose configs are what comfy.model_detection finds in the released checkpoints. No weights are downloaded."""
import dataclasses

import torch

# comfy.model_detection's unet_config for the SD1.5 and SDXL base checkpoints, and Flux.1-dev's.
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
FLUX_DEV = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}
NETWORKS = ("sd15", "sdxl", "flux")


def config_class(name: str):
    """ComfyUI's config class (comfy.supported_models) of the network `name`."""
    import comfy.supported_models as sm
    return {"sd15": sm.SD15, "sdxl": sm.SDXL, "flux": sm.Flux}[name]


def network_config(name: str) -> dict:
    """The full-size network config of `name`, for this ComfyUI."""
    if name != "flux":
        return dict({"sd15": SD15_UNET, "sdxl": SDXL_UNET}[name])
    from comfy.ldm.flux.model import FluxParams
    network = dict(FLUX_DEV)
    # Newer ComfyUI's FluxParams name the text-token axes that carry ids: none for Flux.1, as its checkpoint
    # detection sets (older ones have no such field; harness.tiny.tiny_flux_config does the same).
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        network["txt_ids_dims"] = []
    return network


def random_weights(module: torch.nn.Module, seed: int):
    """Reproducible random weights, drawn on the module's own device (a 12B-parameter network in seconds on a
    GPU) in float32 and stored in each weight's dtype: matrices N(0, 1/fan_in), 1-d weights and RMSNorm scales 1,
    biases 0 (comfy.ops layers start empty)."""
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                draw = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) / p[0].numel() ** 0.5
                p.copy_(draw.to(p.dtype))
                del draw
            elif name.endswith(("weight", "scale")):
                p.fill_(1.0)
            else:
                p.zero_()


def base_model(name: str, dtype=torch.float32, device="cpu", seed=None, manual_cast=None, network=None):
    """The comfy.model_base model of `name` ("sd15", "sdxl", "flux") as ComfyUI's checkpoint loader makes it:
    ComfyUI's own config class (comfy.supported_models) and its get_model, weights of `dtype` computing in
    `manual_cast` (None: in `dtype`; a loader passes comfy.model_management.unet_manual_cast's choice), on `device`
    ("meta": shapes only, no memory). With a seed its weights are random from it (ordinary tensors); without, they
    are left uninitialised inference tensors, as ComfyUI's loader makes them before it loads a checkpoint's.
    `network` replaces the full-size network config (the GPU benchmark's smoke run: the same path, small)."""
    class Config(config_class(name)):
        unet_config = {}
        unet_extra_config = {}

    with torch.inference_mode(seed is None):
        config = Config({**(network or network_config(name)), "dtype": dtype})
        config.set_inference_dtype(dtype, manual_cast)
        model = config.get_model({}, "", device=device)
        if seed is not None:
            random_weights(model.diffusion_model, seed)
        model.eval()
    return model


def unet_model(name: str, dtype=torch.float32, device="cpu", seed=None):
    """A ModelPatcher around base_model(name, ...) (sd15: comfy.model_base.BaseModel; sdxl: SDXL; flux: Flux) that
    loads on `device` and offloads to the CPU."""
    import comfy.model_patcher
    model = base_model(name, dtype, device, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device("cpu"))
