"""The official DG sampler (alsdudrla10/DG, transcribed in official.py: EDM Heun with w₁, w₂ and boosting) against
the pack through ComfyUI on the analytic EDM model of analytic.py (exact denoiser, exact density ratio), in float64:
the pack runs through ComfyUI's CFGGuider and KSAMPLER with guide(). test_device_correctness runs the same comparison
on ComfyUI's device (CUDA on the GPU machine) in float64 and float32."""
import pytest
import torch

import comfy.samplers
from comfy.k_diffusion.sampling import sample_heun
from analytic import SHAPE, analytic_model
from comfy_dg.sampling import sample_dg_heun_boosted
from harness.tiny import empty_conditioning
from official import RecordedNoise, exact_sampler, karras, official_edm_sampler, pack_sampler


def latents(seed=3, n=12):
    """float32 values (what ComfyUI passes on), held in float64."""
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.float64)


@pytest.mark.parametrize("w1,w2", [(2.0, 0.0), (1.0, 0.0), (2.0, 1.0), (0.0, 0.0)])
def test_heun_with_dg_is_the_official_sampler(w1, w2):
    z = latents()
    ours = pack_sampler(z, w1, w2, sample_heun)
    theirs, _, _ = official_edm_sampler(z, w1, w2, boosting=False, churn_noise=lambda i: torch.zeros_like(z))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    if w1:
        plain, _, _ = official_edm_sampler(z, 0.0, 0.0, boosting=False, churn_noise=lambda i: torch.zeros_like(z))
        assert (theirs - plain).abs().max() > 1e-2, "DG changed nothing: the comparison could not fail"


@pytest.mark.parametrize("w1", [1.0, 2.0])
def test_boosting_sampler_is_the_official_boosting(w1):
    z = latents(seed=4, n=16)
    noise = RecordedNoise(z.shape, karras())
    ours = pack_sampler(z, w1, 0.0, sample_dg_heun_boosted, noise_sampler=noise)
    theirs, churned, doubled = official_edm_sampler(z, w1, 0.0, boosting=True, churn_noise=noise.at)
    assert churned and doubled, "no sample was churned or doubled: boosting was not exercised"
    assert sorted(noise.drawn) == sorted(set(churned))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    unboosted, _, _ = official_edm_sampler(z, w1, 0.0, boosting=False, churn_noise=noise.at)
    assert (theirs - unboosted).abs().max() > 1e-2, "boosting changed nothing: the comparison could not fail"


def test_boosting_sampler_without_guidance_is_plain_heun():
    z = latents(seed=6, n=4)
    m = analytic_model("EDM")
    outs = []
    for fn in (sample_dg_heun_boosted, sample_heun):
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(*empty_conditioning(m))
        guider.set_cfg(1.0)
        sampler, result = exact_sampler(fn)
        with torch.inference_mode():
            guider.sample(z, torch.zeros_like(z), sampler, karras(), disable_pbar=True, seed=0)
        outs.append(result[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
