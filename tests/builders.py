"""Small discriminators and sampling runs shared by the tests (real ComfyUI nodes, tiny real models)."""
import torch

import nodes as comfy_nodes
from comfy_extras import nodes_custom_sampler as ncs
from comfy_dg import DiscriminatorInfo, FeatureHeadDiscriminator, StandaloneDiscriminator
from comfy_dg.taps import find_tap
from harness.tiny import empty_conditioning


def standalone(family="SD15", channels=4, seed=0):
    torch.manual_seed(seed)
    with torch.inference_mode(False):
        return StandaloneDiscriminator(DiscriminatorInfo(channels, family), width=16, levels=2, emb_dim=32)


def features(model, seed=0):
    """A prompt-independent features head on the model's own tap (UNet, Flux, MMDiT)."""
    torch.manual_seed(seed)
    bm = model.model
    info = DiscriminatorInfo(bm.latent_format.latent_channels, type(bm.latent_format).__name__)
    tap = find_tap(bm.diffusion_model)
    with torch.inference_mode(False):
        return FeatureHeadDiscriminator(info, tap=tap.name, feature_channels=tap.channels(bm), width=32, emb_dim=32)


def ksampler(model, sampler, batch=2, steps=4, cfg=3.0, seed=7):
    pos, neg = empty_conditioning(model)
    c = model.model.latent_format.latent_channels
    latent = {"samples": torch.zeros(batch, c, 8, 8)}
    with torch.inference_mode():
        (out,) = comfy_nodes.KSampler().sample(model, seed, steps, cfg, sampler, "normal", pos, neg, latent)
    return out["samples"]


def custom_advanced(model, sampler, batch=2, steps=4, cfg=3.0, seed=7):
    with torch.inference_mode():
        return custom_advanced_with(model, ncs.KSamplerSelect.execute(sampler)[0], batch, steps, cfg, seed)


def custom_advanced_with(model, sampler_obj, batch=2, steps=4, cfg=3.0, seed=7):
    """SamplerCustomAdvanced with a SAMPLER object (the pack's samplers)."""
    pos, neg = empty_conditioning(model)
    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    with torch.inference_mode():
        guider = ncs.CFGGuider.execute(model, pos, neg, cfg)[0]
        sigmas = ncs.BasicScheduler.execute(model, "normal", steps, 1.0)[0]
        noise = ncs.RandomNoise.execute(seed)[0]
        out = ncs.SamplerCustomAdvanced.execute(noise, guider, sampler_obj, sigmas, latent)[0]
    return out["samples"]
