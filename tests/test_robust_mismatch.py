"""Discriminators applied to the wrong model, and options out of range, through the Discriminator Guidance node
in process (as ComfyUI loads the pack): each is refused when the node runs (or at validation), with a message
that names both sides and the fix. The server's own range validation is checked in test_robust_server.py."""
import math

import pytest
import torch

from comfy_dg import DiscriminatorInfo, FeatureHeadDiscriminator, StandaloneDiscriminator
from comfy_dg.taps import FluxDouble, UNetMiddle
from harness.tiny import tiny_flux, tiny_model, tiny_sd3


@pytest.fixture(scope="module")
def node(pack):
    return pack["DiscriminatorGuidanceV2"]


def apply(node, model, disc, **kw):
    args = dict(weight=1.0, intermediate_weight=0.0, start_percent=0.0, end_percent=1.0, schedule="constant",
                boost=1.0, class_label=-1)
    args.update(kw)
    with torch.inference_mode():
        return node.execute(model, disc, **args)


def standalone(channels, family):
    with torch.inference_mode(False):
        return StandaloneDiscriminator(DiscriminatorInfo(channels, family), width=16, levels=2, emb_dim=32)


def features_for(model, **overrides):
    bm = model.model
    info = DiscriminatorInfo(bm.latent_format.latent_channels, type(bm.latent_format).__name__)
    kw = dict(feature_channels=UNetMiddle.channels(bm), width=32, emb_dim=32)
    kw.update(overrides)
    with torch.inference_mode(False):
        return FeatureHeadDiscriminator(info, **kw)


@pytest.fixture(scope="module")
def models():
    return {"SD15": tiny_model("EPS", attention=False), "Flux-unet": tiny_model("FLOW", family="Flux", attention=False),
            "SDXL": tiny_model("EPS", family="SDXL", attention=False), "Flux": tiny_flux(), "SD3": tiny_sd3(),
            "Digits": tiny_model("EPS", family="Digits", attention=False)}


def refusal(node, model, disc, *needles, **kw):
    with pytest.raises(ValueError) as caught:
        apply(node, model, disc, **kw)
    message = str(caught.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    return message


@pytest.mark.parametrize("target, family, channels", [("Flux", "Flux", 16), ("SD3", "SD3", 16),
                                                      ("Digits", "Digits", 1)])
def test_a_4_channel_discriminator_on_another_channel_count(node, models, target, family, channels):
    refusal(node, models[target], standalone(4, "SD15"), "4-channel latents (SD15)",
            f"{channels}-channel latents ({family})", f"Load a discriminator trained for {family}")


def test_a_16_channel_discriminator_on_a_4_channel_model(node, models):
    refusal(node, models["SD15"], standalone(16, "Flux"), "16-channel latents (Flux)", "4-channel latents (SD15)",
            "Load a discriminator trained for SD15")


def test_same_channels_other_family(node, models):
    refusal(node, models["SDXL"], standalone(4, "SD15"), "trained for SD15", "model is SDXL",
            "load a discriminator trained for SDXL")
    refusal(node, models["SD3"], standalone(16, "Flux"), "trained for Flux", "model is SD3",
            "load a discriminator trained for SD3")


def test_a_unet_features_discriminator_on_transformers(node, models):
    """A features head trained on a UNet's middle block, given 16-channel Flux metadata so that only the
    architecture differs: refused with both networks named."""
    for target in ("Flux", "SD3"):
        bm = models[target].model
        disc = FeatureHeadDiscriminator(DiscriminatorInfo(16, type(bm.latent_format).__name__), tap="unet_middle",
                                        feature_channels=64, width=32, emb_dim=32)
        kind = {"Flux": "flux", "SD3": "mmdit"}[target]
        refusal(node, models[target], disc, "'unet_middle' features of a unet network", f"network is a {kind}",
                "Use a discriminator trained on this model's own features")


def test_a_flux_features_discriminator_on_a_unet(node, models):
    flux = models["Flux"].model
    disc = FeatureHeadDiscriminator(DiscriminatorInfo(16, "Flux"), tap="flux_double",
                                    feature_channels=FluxDouble.channels(flux), width=32, emb_dim=32)
    refusal(node, models["Flux-unet"], disc, "'flux_double' features of a flux network", "network is a unet")


def test_a_features_discriminator_for_a_wider_network(node, models):
    wide = tiny_model("EPS", model_channels=64, attention=False)
    refusal(node, wide, features_for(models["SD15"]), f"expects {UNetMiddle.channels(models['SD15'].model)} feature "
            f"channels", f"this model gives {UNetMiddle.channels(wide.model)}", "Train one for this checkpoint")


def test_matching_discriminators_are_accepted(node, models):
    """Controls: the same node takes discriminators that fit, so the refusals above are about the mismatch."""
    out = apply(node, models["SD15"], standalone(4, "SD15"), weight=20.0, boost=10.0)
    assert out.args[0] is not models["SD15"]
    apply(node, models["SD15"], features_for(models["SD15"]))
    apply(node, models["Flux"], standalone(16, "Flux"))
    apply(node, models["Digits"], standalone(1, "Digits"))


def test_start_after_end_is_refused_at_validation_and_at_apply_time(node, models):
    message = node.validate_inputs(start_percent=0.8, end_percent=0.2)
    assert isinstance(message, str) and "0.8" in message and "0.2" in message and "swap" in message
    assert node.validate_inputs(start_percent=0.2, end_percent=0.8) is True
    # Only the window's inputs are declared: ComfyUI keeps checking every other input's range itself.
    import inspect
    assert set(inspect.signature(node.validate_inputs).parameters) == {"start_percent", "end_percent"}
    refusal(node, models["SD15"], standalone(4, "SD15"), "start_percent (0.8)", "end_percent (0.2)", "swap them",
            start_percent=0.8, end_percent=0.2)


@pytest.mark.parametrize("option, value, needles", [
    ("weight", math.nan, ["weight", "finite", "nan"]),
    ("weight", math.inf, ["weight", "finite", "inf"]),
    ("weight", 20.5, ["weight is 20.5", "0.0..20.0"]),
    ("intermediate_weight", -0.5, ["intermediate_weight is -0.5", "0.0..20.0"]),
    ("boost", -1.0, ["boost is -1.0", "0.0..10.0"]),
    ("boost", math.nan, ["boost", "nan"]),
    ("start_percent", 1.5, ["start_percent is 1.5", "0.0..1.0"]),
    ("end_percent", -0.1, ["end_percent is -0.1", "0.0..1.0"]),
    ("schedule", "zigzag", ["zigzag", "constant", "cosine"]),
    ("class_label", -2, ["class_label is -2", "-1..100000"]),
    ("class_label", 3, ["class_label 3", "not class-conditional", "set class_label to -1"]),
])
def test_out_of_range_options_are_refused_with_the_value_and_the_range(node, models, option, value, needles):
    refusal(node, models["SD15"], standalone(4, "SD15"), *needles, **{option: value})


def test_class_label_beyond_the_discriminators_classes(node, models):
    with torch.inference_mode(False):
        disc = StandaloneDiscriminator(DiscriminatorInfo(4, "SD15", num_classes=3), width=16, levels=2, emb_dim=32)
    refusal(node, models["SD15"], disc, "class_label 5", "classes 0..2", class_label=5)
    apply(node, models["SD15"], disc, class_label=2)
