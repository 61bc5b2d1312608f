"""Numerics under stress, through ComfyUI's real KSampler on small real models: discriminators that give
non-finite log r or gradients for some samples, half-precision models, and the largest weight and boost the
Discriminator Guidance node allows."""
import logging

import pytest
import torch

from analytic import DATA, MODEL, ExactRatio, alpha_of, analytic_model, evaluate as exact_evaluate
from builders import features, ksampler, standalone
from comfy_dg import guide
from comfy_dg.options import GUIDANCE
from harness.tiny import tiny_model

# The largest weight and boost the Discriminator Guidance node (and guide()) accept.
W_MAX, BOOST_MAX = GUIDANCE["weight"].max, GUIDANCE["boost"].max


class BrokenForFirstSample(torch.nn.Module):
    """A working discriminator for every sample but the first, whose log r or gradient is not finite."""

    def __init__(self, how):
        super().__init__()
        self.how, self.calls = how, 0

    def forward(self, x_in, sigma):
        self.calls += 1
        logit = 0.5 * x_in.flatten(1).mean(1) + 0.1 * x_in.flatten(1).pow(2).mean(1)
        bad = torch.zeros_like(logit, dtype=torch.bool)
        bad[0] = True
        if self.how == "nan-logit":
            return torch.where(bad, torch.full_like(logit, float("nan")), logit)
        if self.how == "inf-logit":
            return torch.where(bad, torch.full_like(logit, float("inf")), logit)
        return _NanGradient.apply(logit, bad)     # finite log r, NaN gradient


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logit, bad):
        ctx.save_for_backward(bad)
        return logit.clone()

    @staticmethod
    def backward(ctx, grad):
        (bad,) = ctx.saved_tensors
        return torch.where(bad, torch.full_like(grad, float("nan")), grad), None


@pytest.fixture(scope="module")
def eps_model():
    return tiny_model("EPS", seed=0, attention=False)


def warnings(caplog):
    return [r for r in caplog.records if r.name == "comfy_dg" and "non-finite" in r.getMessage()]


@pytest.mark.parametrize("how", ["nan-logit", "inf-logit", "nan-gradient"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_non_finite_samples_get_no_correction_for_a_whole_run_with_one_warning_per_run(eps_model, how, sampler,
                                                                                       caplog):
    plain = ksampler(eps_model, sampler, batch=2, steps=5)
    d = BrokenForFirstSample(how)
    guided_model = guide(eps_model, d, weight=2.0)
    with caplog.at_level(logging.WARNING, logger="comfy_dg"):
        guided = ksampler(guided_model, sampler, batch=2, steps=5)
        assert len(warnings(caplog)) == 1, [r.getMessage() for r in warnings(caplog)]
        again = ksampler(guided_model, sampler, batch=2, steps=5)
    assert d.calls >= 2 * 5, "the discriminator was not called every step"
    assert len(warnings(caplog)) == 2          # one per run, not one per evaluation nor one per process
    assert torch.equal(guided[0], plain[0]), "the sample with a non-finite log r or gradient was changed"
    assert not torch.allclose(guided[1], plain[1]), "the healthy sample was not guided"
    assert torch.isfinite(guided).all() and torch.equal(guided, again)


def test_all_samples_non_finite_leaves_the_run_unguided(eps_model, caplog):
    class AllNan(torch.nn.Module):
        def forward(self, x_in, sigma):
            return x_in.flatten(1).mean(1) * float("nan")
    with caplog.at_level(logging.WARNING, logger="comfy_dg"):
        guided = ksampler(guide(eps_model, AllNan(), weight=W_MAX, boost=BOOST_MAX), "euler")
    assert torch.equal(guided, ksampler(eps_model, "euler"))
    assert len(warnings(caplog)) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ["standalone", "features"])
def test_half_precision_models_at_the_largest_weight(dtype, arch):
    m = tiny_model("EPS", dtype=dtype, seed=1, attention=False)
    d = standalone() if arch == "standalone" else features(m)
    plain = ksampler(m, "euler")
    guided = ksampler(guide(m, d, weight=W_MAX, boost=BOOST_MAX), "euler")
    assert torch.isfinite(plain).all()
    assert torch.isfinite(guided).all() and not torch.equal(guided, plain)


def test_half_precision_discriminator(eps_model):
    """A discriminator module in bfloat16 (any torch.nn.Module may be passed to guide()): the gradient is still
    taken and applied in float32."""
    d = standalone().to(torch.bfloat16)
    guided = ksampler(guide(eps_model, d, weight=W_MAX), "euler")
    assert torch.isfinite(guided).all() and not torch.equal(guided, ksampler(eps_model, "euler"))


class Steep(torch.nn.Module):
    """log r = 11·tanh(k·x₀): inside the clip range everywhere, with a gradient up to 11·k."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x_in, sigma):
        return 11.0 * torch.tanh(self.k * x_in.flatten(1)[:, 0])


class Wiggly(torch.nn.Module):
    """log r = 11·mean(sin(k·x)): never saturates, a gradient of order 11·k/n everywhere."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x_in, sigma):
        return 11.0 * torch.sin(self.k * x_in.flatten(1)).mean(1)


def scaled_standalone(factor):
    """A standalone discriminator whose weights are all multiplied by `factor` (finite, so a file with them
    loads)."""
    d = standalone()
    with torch.no_grad():
        for p in d.parameters():
            p.mul_(factor)
    return d


DISCRIMINATORS = {
    "standalone": lambda m: standalone(),
    "features": lambda m: features(m),
    "weights-x1e12": lambda m: scaled_standalone(1e12),
    "steep-1e8": lambda m: Steep(1e8),
    "wiggly-1e3": lambda m: Wiggly(1e3),
    "wiggly-1e10": lambda m: Wiggly(1e10),
}


@pytest.mark.parametrize("model_type", ["EPS", "V_PREDICTION", "EDM", "FLOW"])
def test_the_largest_weight_never_makes_a_latent_non_finite(model_type):
    m = tiny_model(model_type, seed=2, attention=False)
    for name, make in DISCRIMINATORS.items():
        for sampler in ("euler", "dpmpp_2m"):
            out = ksampler(guide(m, make(m), weight=W_MAX, boost=BOOST_MAX), sampler, steps=5)
            assert torch.isfinite(out).all(), f"{model_type} {name} {sampler}: non-finite latent at w={W_MAX}"


@pytest.mark.parametrize("model_type", ["EPS", "FLOW"])
def test_a_finite_but_enormous_gradient_does_not_make_latents_non_finite(model_type, caplog):
    """A gradient of ~1e30 (finite) at w=20, boost=10 would move x to ~1e35 and overflow the model's next
    evaluation: such a correction is treated as unusable (no correction, one warning)."""
    m = tiny_model(model_type, seed=2, attention=False)
    with caplog.at_level(logging.WARNING, logger="comfy_dg"):
        out = ksampler(guide(m, Wiggly(1e30), weight=W_MAX, boost=BOOST_MAX), "euler", steps=5)
    assert torch.isfinite(out).all()
    assert caplog.text.count("absurdly large") == 1
    torch.testing.assert_close(out, ksampler(m, "euler", steps=5))


@pytest.mark.parametrize("model_type", ["EPS", "FLOW"])
def test_no_hidden_clamp_at_the_largest_weight(model_type):
    """With the exact density ratio (Theorem 1's discriminator), the correction at the node's largest weight is
    exactly W_MAX times the w = 1 correction, and boost multiplies it exactly for samples with log r < 0: no
    safety clamp engages on a sound discriminator, even at the edge of the range."""
    m = analytic_model(model_type)
    sigmas = [0.7, 0.3] if model_type == "FLOW" else [5.0, 1.0, 0.2]
    points = []
    for i, sigma in enumerate(sigmas):
        s = torch.full((6,), sigma, dtype=torch.float64)
        points.append((sigma, MODEL.sample_noisy(6, s, alpha_of(model_type, s), seed=40 + i)))
    ms = m.model.model_sampling
    ratio = ExactRatio(ms, model_type)
    plain = exact_evaluate(m, points, 1.0)
    one = exact_evaluate(guide(m, ratio, weight=1.0), points, 1.0)
    top = exact_evaluate(guide(m, ratio, weight=W_MAX, boost=BOOST_MAX), points, 1.0)
    moved = 0
    for (sigma, x, p), (_, _, d1), (_, _, dt) in zip(plain, one, top):
        s = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        a = alpha_of(model_type, s)
        log_r = DATA.log_density(x, s, a) - MODEL.log_density(x, s, a)
        factor = torch.where(log_r < 0, W_MAX * BOOST_MAX, W_MAX).reshape(-1, 1)
        torch.testing.assert_close(dt - p, factor * (d1 - p), rtol=1e-9, atol=1e-12)
        moved += int(((d1 - p).abs().amax(1) > 1e-6).sum())
    assert moved >= 6, "the exact ratio barely moved the denoiser: the comparison could not fail"
