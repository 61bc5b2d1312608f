"""Correctness on the device ComfyUI samples on: the CPU here and in CI; CUDA when COMFY_DG_TEST_DEVICE=cuda (the GPU
benchmark, `python -m harness.bench.gpu`, runs this file that way on the GPU machine).

- Theorem 1 in float64 and float32: with the exact density ratio and w = 1 the guided denoiser is the data's
  posterior mean (test_theorem1's setting, on the device, in the test's precision throughout);
- the official sampler: the pack's guided Heun (w₁, w₂) and its boosting sampler through ComfyUI on the device give
  the official EDM sampler with DG (official.py, run on the same device in the same dtype);
- half precision: fp16 and bf16 models (UNet, SDXL-style UNet, Flux) sample finite guided latents with both
  discriminator architectures.
"""
import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
from comfy.k_diffusion.sampling import sample_heun
from analytic import DATA, MODEL, SHAPE, SIGMAS, ExactRatio, alpha_of, analytic_model, evaluate
from builders import features, standalone
from comfy_dg import guide
from comfy_dg.dg import LOGIT_MAX
from comfy_dg.sampling import sample_dg_heun_boosted
from harness.tiny import empty_conditioning, tiny_flux, tiny_model
from official import RecordedNoise, karras, official_edm_sampler, pack_sampler

DEVICE = comfy.model_management.get_torch_device()
DTYPES = [torch.float64, torch.float32]
IDS = ["float64", "float32"]
# Relative errors allowed (the worst measured on the CPU, ComfyUI 0.3.75 and 0.33.0 alike, in brackets). Theorem 1
# against the exact posterior mean: float64 rounding [1.6e-13]; float32 rounding through the mixture's log-densities
# and autograd [9.4e-5]; both at σ = 14 for EPS, where the correction nearly cancels x. The official sampler on the
# same device in the same dtype, final latents: [float64 1.9e-15; float32 8.8e-7].
THEOREM1 = {torch.float64: 1e-11, torch.float32: 3e-4}
OFFICIAL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("model_type", ["EPS", "FLOW"])
def test_theorem1_on_the_device(model_type, dtype):
    m = analytic_model(model_type, dtype)
    points = []
    for i, sigma in enumerate(SIGMAS[model_type]):
        s = torch.full((6,), sigma, dtype=torch.float64)
        x = MODEL.sample_noisy(6, s, alpha_of(model_type, s), seed=10 + i)
        points.append((sigma, x.to(device=DEVICE, dtype=dtype)))
    guided = evaluate(guide(m, ExactRatio(m.model.model_sampling, model_type), weight=1.0), points, 4.0)
    checked = 0
    for sigma, x, d in guided:
        assert d.device.type == DEVICE.type and d.dtype == dtype
        x, d = x.double().cpu(), d.double().cpu()
        s = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        a = alpha_of(model_type, s)
        target = DATA.posterior_mean(x, s, a)
        # Where d is clipped no correction is applied; a margin, as float32's log r may round across the clip.
        inside = (DATA.log_density(x, s, a) - MODEL.log_density(x, s, a)).abs() < LOGIT_MAX - 0.5
        rel = (d - target).norm(dim=1) / target.norm(dim=1)
        assert rel[inside].max() <= THEOREM1[dtype], f"σ={sigma}: relative error {rel[inside].max():.2e}"
        checked += int(inside.sum())
    assert checked >= 0.8 * sum(p[1].shape[0] for p in points)


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("sampler,w1,w2", [("heun", 2.0, 0.0), ("heun", 2.0, 1.0), ("boosted", 2.0, 0.0)])
def test_official_sampler_on_the_device(sampler, w1, w2, dtype):
    z = torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(3)).to(device=DEVICE, dtype=dtype)
    zeros = lambda i: torch.zeros_like(z)       # noqa: E731 - no churn
    if sampler == "boosted":
        noise = RecordedNoise(z.shape, karras(dtype), dtype=dtype, device=DEVICE)
        ours = pack_sampler(z, w1, w2, sample_dg_heun_boosted, noise_sampler=noise)
        theirs, churned, _ = official_edm_sampler(z, w1, w2, boosting=True, churn_noise=noise.at)
        assert churned and sorted(noise.drawn) == sorted(set(churned))
    else:
        ours = pack_sampler(z, w1, w2, sample_heun)
        theirs, _, _ = official_edm_sampler(z, w1, w2, boosting=False, churn_noise=zeros)
    assert ours.device.type == DEVICE.type and ours.dtype == dtype
    err = _relative(ours, theirs)
    assert err <= OFFICIAL[dtype], f"relative difference {err:.2e}"
    plain, _, _ = official_edm_sampler(z, 0.0, 0.0, boosting=False, churn_noise=zeros)
    assert _relative(plain, theirs) > 1e3 * OFFICIAL[dtype], "DG changed nothing: the comparison could not fail"


def test_comfyui_own_heun_gives_the_official_sampler():
    """ComfyUI's heun as users pick it (sampler_object("heun"): its noise scaling, its σ, its float32 result) on
    float64 latents. ComfyUI 0.33 casts the noise to float32 before sampling (CFGGuider.outer_sample), so
    k-diffusion's s_in = x.new_ones(B) is float32 and every σ reaches the model and the post-CFG hook as σᵢ·s_in,
    rounded to float32, although the sigmas are float64 and x is float64 from the first step on; 0.3.75 keeps them
    float64. Measured on the CPU from the same start, ComfyUI's heun against the official sampler: 2.8e-9 relative
    unguided, 1.2e-7 guided (the DG term w·σ²·∇ log r feels σ's rounding more than the denoiser does); the same
    sampler function started from that state held in float64 gets float64 σ and 1.3e-15 (pack_sampler starts so).
    The pack computes at the σ ComfyUI hands it, as the model does: the difference is ComfyUI's, and below float32
    precision, the most any real model computes in. Measured here (final latents, float32): 3.6e-8 on 0.3.75,
    1.2e-7 on 0.33.0."""
    z = torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(3)).to(device=DEVICE, dtype=torch.float64)
    m = analytic_model("EDM")
    guided = guide(m, ExactRatio(m.model.model_sampling, "EDM"), weight=2.0)
    guider = comfy.samplers.CFGGuider(guided)
    guider.set_conds(*empty_conditioning(guided))
    guider.set_cfg(1.0)
    with torch.inference_mode():
        out = guider.sample(z, torch.zeros_like(z), comfy.samplers.sampler_object("heun"),
                            karras(device=DEVICE), disable_pbar=True, seed=0)
        out = m.model.process_latent_in(out)        # back from the latent format's scaling to sampler space
    theirs, _, _ = official_edm_sampler(z, 2.0, 0.0, boosting=False, churn_noise=lambda i: torch.zeros_like(z))
    assert out.dtype == torch.float32 and out.device.type == DEVICE.type
    err = _relative(out.double(), theirs)
    assert err <= 1e-6, f"relative difference {err:.2e}"


@pytest.mark.parametrize("family", ["SD15", "SDXL", "Flux"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models_sample_finite_latents(dtype, family):
    m = tiny_flux(dtype=dtype) if family == "Flux" else tiny_model("EPS", family=family, dtype=dtype)
    pos, neg = empty_conditioning(m)
    latent_format = m.model.latent_format
    latent = torch.zeros(1, latent_format.latent_channels, 8, 8)

    def run(model):
        with torch.inference_mode():
            noise = comfy.sample.prepare_noise(latent, 3)
            return comfy.sample.sample(model, noise, 3, 3.0, "euler", "normal", pos, neg, latent, seed=3,
                                       disable_pbar=True)
    plain = run(m)
    assert torch.isfinite(plain).all()
    heads = {"standalone": standalone(type(latent_format).__name__, latent_format.latent_channels),
             "features": features(m)}
    for arch, disc in heads.items():
        guided = run(guide(m, disc, weight=2.0))
        assert torch.isfinite(guided).all(), arch
        assert not torch.equal(plain, guided), f"{arch}: the guidance changed nothing"
