"""Small ComfyUI models in one .safetensors file with their configuration: the demo's digits model, and any model
built from ComfyUI's own classes at a small size (the training command line takes them like a checkpoint).

The file holds the network's weights under `model.`, optionally a VAE's under `vae.`, and in its metadata the
explicit configuration to rebuild both with ComfyUI's classes (nothing is unpickled):

    {"arch": "unet" | "flux" | "sd3", "config": <the network's unet_config>, "model_type": "EPS" | ...,
     "latent_format": "SD15" | "SDXL" | "SD3" | "Flux" | "Digits", "shift": <flow shift, optional>,
     "vae": <AutoencoderKL ddconfig, or absent>}
"""
import json

import torch

from .errors import DGError

KEY = "comfy_dg.small_model"
ARCHS = ("unet", "flux", "sd3")


class SmallModelError(DGError):
    pass


def digits_latent_format():
    """A pixel-space "latent" for 8×8 grayscale images in [-1, 1]: one channel, no scaling."""
    import comfy.latent_formats

    class Digits(comfy.latent_formats.LatentFormat):
        latent_channels = 1
        latent_dimensions = 2
        scale_factor = 1.0
    return Digits


def _latent_format(name: str):
    import comfy.latent_formats
    if name == "Digits":
        return digits_latent_format()
    fmt = getattr(comfy.latent_formats, name, None)
    if fmt is None:
        raise SmallModelError(f"comfy-dg: unknown latent format {name!r} in a small-model file")
    return fmt


def _pooled_vector_model():
    import comfy.model_base

    class PooledVectorModel(comfy.model_base.BaseModel):
        """Feeds the conditioning's pooled_output to the UNet as its `y` vector, as SDXL does (without SDXL's
        size embeddings), when the config asks for one."""

        def encode_adm(self, **kwargs):
            if not self.model_config.unet_config.get("adm_in_channels"):
                return None
            return kwargs.get("pooled_output")
    return PooledVectorModel


def build(spec: dict, dtype=torch.float32):
    """A ModelPatcher around a real comfy.model_base model of `spec` (weights uninitialised, in `dtype`)."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    arch = spec.get("arch", "unet")
    if arch not in ARCHS:
        raise SmallModelError(f"comfy-dg: unknown small-model architecture {arch!r} (known: {', '.join(ARCHS)})")
    base_config, model_class = {
        "unet": (comfy.supported_models.SD15, _pooled_vector_model()),
        "flux": (comfy.supported_models.Flux, comfy.model_base.Flux),
        "sd3": (comfy.supported_models.SD3, comfy.model_base.SD3),
    }[arch]

    class Config(base_config):
        unet_config = {}
        unet_extra_config = {}
        latent_format = _latent_format(spec.get("latent_format", base_config.latent_format.__name__))
        sampling_settings = {"shift": spec["shift"]} if "shift" in spec else dict(base_config.sampling_settings)

    with torch.inference_mode(False):
        config = Config({**spec["config"], "dtype": dtype})
        config.set_inference_dtype(dtype, None)
        kwargs = {"model_type": getattr(comfy.model_base.ModelType, spec["model_type"])} if "model_type" in spec \
            else {}
        model = model_class(config, device="cpu", **kwargs)
        model.diffusion_model.to(dtype)
        model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=torch.device("cpu"))
    patcher.small_model_spec = spec
    return patcher


def build_vae(ddconfig: dict):
    """A real ComfyUI VAE (comfy.sd.VAE around ComfyUI's AutoencoderKL) of this ddconfig; weights uninitialised."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = {"params": {"embed_dim": ddconfig["z_channels"], "ddconfig": ddconfig}}
    with torch.inference_mode(False):
        sd = {k: v.detach().clone() for k, v in AutoencoderKL(**config["params"]).state_dict().items()}
    vae = comfy.sd.VAE(sd=sd, config=config)
    vae.latent_channels = ddconfig["z_channels"]     # comfy.sd.VAE assumes 4 for a VAE given by its config
    vae.small_model_ddconfig = ddconfig
    return vae


def null_conditioning(model_patcher):
    """Positive and negative CONDITIONING of one all-zero token (and a zero pooled vector where the network takes
    one), for small models without a text encoder."""
    cfg = model_patcher.model.model_config.unet_config
    width = cfg.get("context_dim") or cfg.get("context_in_dim") \
        or ((cfg.get("context_embedder_config") or {}).get("params") or {}).get("in_features")
    pooled = cfg.get("adm_in_channels") or cfg.get("vec_in_dim")
    extra = {"pooled_output": torch.zeros(1, pooled)} if pooled else {}
    return [[torch.zeros(1, 1, width), dict(extra)]], [[torch.zeros(1, 1, width), dict(extra)]]


def save(model_patcher, vae, path):
    """Write a model made by build() (and a VAE made by build_vae(), or None) to `path`, atomically."""
    from .atomic import save_safetensors
    spec = dict(model_patcher.small_model_spec)
    sd = {f"model.{k}": v.detach().float().cpu().contiguous()
          for k, v in model_patcher.model.diffusion_model.state_dict().items()}
    if vae is not None:
        spec["vae"] = vae.small_model_ddconfig
        sd.update({f"vae.{k}": v.detach().float().cpu().contiguous()
                   for k, v in vae.first_stage_model.state_dict().items()})
    save_safetensors(sd, str(path), {KEY: json.dumps(spec)})


def is_small_model(path) -> bool:
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return KEY in (f.metadata() or {})
    except Exception:
        return False


def load(path):
    """(ModelPatcher, VAE or None) from a file written by save()."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        spec = json.loads(f.metadata()[KEY])
        state = {k: f.get_tensor(k) for k in f.keys()}
    ddconfig = spec.pop("vae", None)
    model = build(spec)
    with torch.inference_mode(False):
        model.model.diffusion_model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    if ddconfig is None:
        return model, None
    vae = build_vae(ddconfig)
    with torch.inference_mode(False):
        vae.first_stage_model.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("vae.")})
    return model, vae
