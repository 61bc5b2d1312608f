"""A features head trained under the negative prompt takes its features from the sampler's own uncond forward
(the UNet tap's fast path, comfy_dg/taps/unet.py): the same guidance as its own second pass, with no second pass."""
import pytest
import torch

import nodes as comfy_nodes
from comfy_dg import DiscriminatorInfo, FeatureHeadDiscriminator, IncompatibleDiscriminator, guide
from comfy_dg import load_discriminator, save_discriminator
from comfy_dg import dg
from comfy_dg.patch import GuidancePatch
from comfy_dg.taps import UNetMiddle, unet as unet_tap
from comfy_dg.tensors import autograd_weights
from harness.tiny import empty_conditioning, tiny_model
from comfy_dg.training import TrainConfig, Trainer, TrainingError
from comfy_dg.training.conditioning import negative_conditioning


def prompts(model, seed=5):
    pos, neg = empty_conditioning(model)
    g = torch.Generator().manual_seed(seed)
    return pos, [[torch.randn(neg[0][0].shape, generator=g, dtype=torch.float32), dict(neg[0][1])]]


def head_under(model, negative, seed=0, dtype=None):
    bm = model.model
    context, y = negative_conditioning(model, negative, (bm.latent_format.latent_channels, 8, 8))
    dtype = dtype or bm.get_dtype()
    torch.manual_seed(seed)
    with torch.inference_mode(False):
        d = FeatureHeadDiscriminator(DiscriminatorInfo(4, type(bm.latent_format).__name__),
                                     feature_channels=UNetMiddle.channels(bm), width=32, emb_dim=32,
                                     context_tokens=context.shape[0], context_dim=context.shape[1],
                                     y_dim=0 if y is None else y.numel()).to(dtype)
        d.set_conditioning(context, y)
    return d


@pytest.fixture
def second_passes(monkeypatch):
    """Counts the feature tap's own passes through the UNet."""
    calls = []
    features = UNetMiddle.features

    def counted(*args, **kwargs):
        calls.append(1)
        return features(*args, **kwargs)
    monkeypatch.setattr(UNetMiddle, "features", staticmethod(counted))
    return calls


def sample(model, positive, negative, sampler="euler", cfg=3.0, steps=4):
    latent = {"samples": torch.zeros(2, 4, 8, 8, dtype=model.model.get_dtype())}
    with torch.inference_mode():
        (out,) = comfy_nodes.KSampler().sample(model, 7, steps, cfg, sampler, "normal", positive, negative, latent)
    return out["samples"]


@pytest.mark.parametrize("family,sampler,first", [("SD15", "euler", False), ("SD15", "heun", True),
                                                   ("SD15", "dpmpp_sde", False), ("SDXL", "dpmpp_2m", False)])
def test_shared_forward_gives_the_second_pass_result_without_a_second_pass(family, sampler, first, second_passes,
                                                                           monkeypatch):
    model = tiny_model("EPS", family=family, dtype=torch.float64)
    pos, neg = prompts(model)
    guided = guide(model, head_under(model, neg), weight=3.0, intermediate_weight=0.0 if first else 3.0)
    shared = sample(guided, pos, neg, sampler)
    assert not second_passes
    monkeypatch.setattr(unet_tap, "matches", lambda uncond, conditioning: False)
    own_pass = sample(guided, pos, neg, sampler)
    assert second_passes
    unguided = sample(model, pos, neg, sampler)
    assert (own_pass - unguided).abs().max() > 1e-3
    torch.testing.assert_close(shared, own_pass, rtol=0, atol=1e-10)


def test_float32_matches_to_rounding(second_passes, monkeypatch):
    model = tiny_model("EPS")
    pos, neg = prompts(model)
    guided = guide(model, head_under(model, neg), weight=3.0)
    shared = sample(guided, pos, neg)
    monkeypatch.setattr(unet_tap, "matches", lambda uncond, conditioning: False)
    own_pass = sample(guided, pos, neg)
    assert (own_pass - sample(model, pos, neg)).abs().max() > 1e-2
    torch.testing.assert_close(shared, own_pass, rtol=0, atol=2e-3)


@pytest.mark.parametrize("case", ["other negative", "cfg 1", "area"])
def test_any_other_uncond_takes_the_second_pass(case, second_passes):
    model = tiny_model("EPS", dtype=torch.float64)
    pos, neg = prompts(model)
    guided = guide(model, head_under(model, neg), weight=3.0)
    cfg = 3.0
    if case == "other negative":
        neg = prompts(model, seed=6)[1]
    elif case == "cfg 1":
        cfg = 1.0
    else:
        neg = [[neg[0][0], dict(neg[0][1], area=(8, 8, 0, 0), strength=1.0)]]
    sample(guided, pos, neg, cfg=cfg)
    assert len(second_passes) == 4


def test_conditioning_is_saved_checked_and_trained_under(tmp_path, second_passes):
    model = tiny_model("EPS")
    pos, neg = prompts(model)
    d = head_under(model, neg)
    save_discriminator(d, tmp_path / "d.safetensors")
    loaded = load_discriminator(tmp_path / "d.safetensors")
    torch.testing.assert_close(loaded.conditioning[0], d.conditioning[0])
    assert loaded.config()["context_tokens"] == 1

    wide = tiny_model("EPS", context_dim=48)
    with pytest.raises(IncompatibleDiscriminator, match="width 32.*width 48"):
        guide(wide, loaded)

    real, fake = torch.randn(16, 4, 8, 8), torch.randn(16, 4, 8, 8) + 0.5
    config = TrainConfig(steps=2, batch_size=8, eval_every=1, heldout_fraction=0.25, augment=False)
    trainer = Trainer(model, real, fake, config, conditioning=d.conditioning)
    trained = trainer.run()
    assert second_passes, "the trainer takes the features under the stored conditioning"
    torch.testing.assert_close(trained.conditioning[0], d.conditioning[0])
    with pytest.raises(TrainingError, match="features architecture"):
        Trainer(model, real, fake, TrainConfig(architecture="standalone"), conditioning=d.conditioning)
    with pytest.raises(TrainingError, match="one plain negative"):
        negative_conditioning(model, neg + neg, (4, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype, second_passes, monkeypatch):
    """A float32 head on a half-precision network: the shared forward's log r and ∇ₓ log r agree with the head's
    own pass (compared at one evaluation: whole runs in half precision differ by the
    rounding of the split vs the batched CFG forward)."""
    from probe import evaluate
    model = tiny_model("EPS", dtype=dtype)
    negative = empty_conditioning(model)[1]           # the probe's own negative
    head = head_under(model, negative, dtype=torch.float32)
    taken = []
    take = GuidancePatch._take_fast_result
    monkeypatch.setattr(GuidancePatch, "_take_fast_result",
                        lambda self, x, sigma: taken.append(take(self, x, sigma)) or taken[-1])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 3.0
    evaluate(guide(model, head, weight=1.0), [(3.0, x)], cfg=3.0)
    assert not second_passes and taken and taken[0] is not None
    logit, grad = taken[0]
    ms = model.model.model_sampling
    autograd_weights(model.model.diffusion_model)
    with torch.enable_grad():
        xg, sigma = dg.leaf(x), torch.full((2,), 3.0)
        ref_logit, ref_grad = dg.log_ratio_and_grad(head.bind(model.model)(ms.calculate_input(sigma, xg), sigma), xg)
    assert second_passes
    assert torch.isfinite(grad).all() and ref_grad.abs().max() > 0
    assert (grad - ref_grad).norm() < 1e-3 * ref_grad.norm(), float((grad - ref_grad).norm() / ref_grad.norm())
    torch.testing.assert_close(logit, ref_logit, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", ["two heads", "one head twice"])
def test_chained_guidance_nodes_share_one_forward(case, second_passes, monkeypatch):
    """Any number of chained Discriminator Guidance patches whose heads were trained under the negative prompt:
    each gets its own log r and gradient from the one shared uncond forward, equal to the own-pass path."""
    model = tiny_model("EPS", dtype=torch.float64)
    pos, neg = prompts(model)
    first = head_under(model, neg, seed=0)
    second = first if case == "one head twice" else head_under(model, neg, seed=1)
    chained = guide(guide(model, first, weight=2.0), second, weight=1.5, intermediate_weight=0.5)
    shared = sample(chained, pos, neg, "heun")
    assert not second_passes
    monkeypatch.setattr(unet_tap, "matches", lambda uncond, conditioning: False)
    own_pass = sample(chained, pos, neg, "heun")
    assert second_passes
    single = sample(guide(model, first, weight=2.0), pos, neg, "heun")
    assert (own_pass - single).abs().max() > 1e-3, "the second patch changed nothing"
    torch.testing.assert_close(shared, own_pass, rtol=0, atol=1e-10)
