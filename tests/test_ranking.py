"""Rank by realism: scores are the discriminator's log r at one σ, averaged over seeded noise draws."""
import numpy as np
import pytest
import torch

from comfy_dg import DGError, DiscriminatorInfo, FeatureHeadDiscriminator
from comfy_dg.dg import LOGIT_MAX
from comfy_dg.pictures import latent_preview, scored_grid
from comfy_dg.ranking import keep_best, realism_scores
from comfy_dg.taps import UNetMiddle
from harness.tiny import tiny_model


@pytest.fixture(scope="module")
def setup():
    m = tiny_model("EPS", seed=0)
    torch.manual_seed(0)
    disc = FeatureHeadDiscriminator(DiscriminatorInfo(4, "SD15"), feature_channels=UNetMiddle.channels(m.model),
                                    width=32).eval()
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return m, disc, latents


def test_scores_are_the_mean_log_ratio_over_seeded_draws(setup):
    m, disc, latents = setup
    with torch.inference_mode():
        scores = realism_scores(m, disc, latents, sigma=0.3, draws=3, seed=7)
    ms = m.model.model_sampling
    x0 = m.model.process_latent_in(latents)
    g = torch.Generator().manual_seed(7)
    expected = torch.zeros(5, dtype=torch.float64)
    s = torch.full((5,), 0.3)
    for _ in range(3):
        eps = torch.randn(x0.shape, generator=g)
        x_in = ms.calculate_input(s, ms.noise_scaling(s, eps, x0))
        with torch.no_grad():
            expected += disc.bind(m.model)(x_in, s).clamp(-LOGIT_MAX, LOGIT_MAX).double()
    torch.testing.assert_close(scores, (expected / 3).float(), rtol=1e-5, atol=1e-6)
    # Same seed, same scores; another seed, other noise.
    torch.testing.assert_close(realism_scores(m, disc, latents, sigma=0.3, draws=3, seed=7), scores)
    assert not torch.allclose(realism_scores(m, disc, latents, sigma=0.3, draws=3, seed=8), scores)


def test_sigma_is_clipped_to_the_models_range(setup):
    m, disc, latents = setup
    lo = float(m.model.model_sampling.sigma_min)
    torch.testing.assert_close(realism_scores(m, disc, latents, sigma=0.0, draws=1),
                               realism_scores(m, disc, latents, sigma=lo, draws=1))


def test_bad_requests_are_refused(setup):
    m, disc, latents = setup
    with pytest.raises(DGError, match="batch of latents"):
        realism_scores(m, disc, latents[0])
    with pytest.raises(DGError, match="class-conditional"):
        realism_scores(m, disc, latents, class_label=2)
    with pytest.raises(DGError, match="channel"):
        realism_scores(m, disc, torch.randn(2, 3, 8, 8))


def test_keep_best_orders_best_first_and_ties_by_position():
    assert keep_best(torch.tensor([0.1, 2.0, -1.0, 2.0]), 3).tolist() == [1, 3, 0]
    assert keep_best(torch.tensor([0.5]), 4).tolist() == [0]


def test_scored_grid_and_latent_preview():
    digits = torch.linspace(-1, 1, 3 * 64).reshape(3, 1, 8, 8)
    pictures = latent_preview(digits)
    assert pictures.shape == (3, 8, 8, 3)
    torch.testing.assert_close(pictures[..., 0], ((digits[:, 0] + 1) / 2))
    grid = scored_grid(pictures, [1.5, 0.2, -3.0], kept=2)
    # Two columns of 64-pixel cells (8×8 images enlarged), two rows with their captions.
    assert grid.dtype.name == "uint8" and grid.shape[1] > 2 * 64 and grid.shape[0] > 2 * (64 + 14)
    # RGBA (as Join Image with Alpha makes) and grey images are shown as the Comparison Grid shows them: opaque
    # RGBA exactly as its RGB, grey as its three equal channels.
    opaque = torch.cat([pictures, torch.ones(3, 8, 8, 1)], dim=-1)
    assert np.array_equal(scored_grid(opaque, [1.5, 0.2, -3.0], kept=2), grid)
    assert np.array_equal(scored_grid(pictures[..., :1], [1.5, 0.2, -3.0], kept=2),
                          scored_grid(pictures[..., :1].expand(-1, -1, -1, 3), [1.5, 0.2, -3.0], kept=2))
