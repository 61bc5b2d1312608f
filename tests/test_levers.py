"""Training levers: the paper's VP importance sampling of σ, the reconstruction objective, the head's width."""
import math

import numpy as np
import pytest
import torch

from comfy_dg.errors import OptionError
from comfy_dg.training import TrainConfig, Trainer, TrainingError
from comfy_dg.training import noise, objectives
from comfy_dg.training.conditioning import prompt_conds
from gmm import GaussianMixture
from harness.tiny import empty_conditioning, tiny_flux, tiny_model

BETA_0, BETA_1 = 0.1, 20.0


def vp_sigma2(t):
    """σ_VP²(t) = 1 − exp(−∫β), written out here independently of comfy_dg.training.noise."""
    return 1.0 - np.exp(-(BETA_0 * t + 0.5 * (BETA_1 - BETA_0) * t ** 2))


def test_vp_time_range_in_edm_sigma():
    # σ_EDM = √(σ_VP² / (1 − σ_VP²)) at the paper's t ∈ [1e-5, 1].
    for t in (1e-5, 0.3, 1.0):
        s2 = vp_sigma2(np.float64(t))
        assert noise.vp_edm_sigma(t) == pytest.approx(math.sqrt(s2 / (1 - s2)), rel=1e-9)
    assert noise.vp_edm_sigma(1e-5) == pytest.approx(1.0003e-3, rel=1e-3)
    assert noise.vp_edm_sigma(1.0) == pytest.approx(152.17, rel=1e-4)


def test_vp_importance_sampling_follows_the_papers_density():
    """Quantiles of the drawn σ against the paper's density p(t) ∝ β(t)/σ_VP²(t), integrated numerically on a fine
    t grid and pushed through σ_EDM(t)."""
    t = np.geomspace(1e-5, 1.0, 400_001)
    density = (BETA_0 + (BETA_1 - BETA_0) * t) / vp_sigma2(t)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(t))])
    cdf /= cdf[-1]
    s2 = vp_sigma2(t)
    sigma_of_t = np.sqrt(s2 / (1 - s2))
    drawn = noise.vp_importance_edm_sigmas(200_000, torch.Generator().manual_seed(0)).numpy()
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        expected = np.interp(q, cdf, sigma_of_t)
        assert np.quantile(drawn, q) == pytest.approx(expected, rel=0.02), q
    # Not the "model" sampling: uniform timesteps of an EPS model put their median σ elsewhere.
    ms = tiny_model("EPS").model.model_sampling
    t_range = noise.timestep_range(ms)
    uniform = noise.sample_sigmas(ms, t_range, 20_000, torch.Generator().manual_seed(0), "model")
    vp = noise.sample_sigmas(ms, t_range, 20_000, torch.Generator().manual_seed(0), "vp_importance")
    assert abs(float(uniform.median().log() - vp.median().log())) > 0.5


def test_vp_importance_on_an_eps_model_is_the_edm_sigma_clipped_to_its_range():
    ms = tiny_model("EPS").model.model_sampling
    lo, hi = float(ms.sigma_min), float(ms.sigma_max)
    edm = noise.vp_importance_edm_sigmas(50_000, torch.Generator().manual_seed(1))
    sigma = noise.sample_sigmas(ms, noise.timestep_range(ms), 50_000, torch.Generator().manual_seed(1),
                                "vp_importance")
    torch.testing.assert_close(sigma.double(), edm.clamp(lo, hi), rtol=1e-5, atol=0)
    # Log-uniform over [0.0010, 152.2]: the shares clipped onto each end are log ratios.
    span = math.log(noise.vp_edm_sigma(1.0) / noise.vp_edm_sigma(1e-5))
    assert float((sigma <= lo * 1.00001).float().mean()) == pytest.approx(math.log(lo / noise.vp_edm_sigma(1e-5)) / span,
                                                                         abs=0.01)
    assert float((sigma >= hi * 0.99999).float().mean()) == pytest.approx(math.log(noise.vp_edm_sigma(1.0) / hi) / span,
                                                                         abs=0.01)


def test_vp_importance_on_a_flow_model_matches_the_signal_to_noise_ratio():
    ms = tiny_flux().model.model_sampling
    lo, hi = 0.02, 0.98
    edm = torch.tensor([0.01, 0.05, 0.5, 1.0, 3.0, 20.0, 100.0], dtype=torch.float64)
    sigma = noise.model_sigma_for_snr(ms, edm, lo, hi).double()
    # x = (1 − σ)·x0 + σ·ε has noise over signal σ/(1 − σ).
    expected = (edm / (1 + edm)).clamp(lo, hi)
    torch.testing.assert_close(sigma, expected, rtol=1e-5, atol=1e-7)


def test_unknown_options_are_refused():
    with pytest.raises(OptionError, match="sigma_sampling"):
        TrainConfig(sigma_sampling="uniform").validate()
    with pytest.raises(OptionError, match="objective"):
        TrainConfig(objective="hinge").validate()
    with pytest.raises(OptionError, match="width"):
        TrainConfig(width=-1).validate()
    m = tiny_model("EPS")
    real = fake = torch.randn(8, 4, 8, 8)
    with pytest.raises(TrainingError, match="positive"):
        Trainer(m, real, fake, TrainConfig(objective="reconstruction", batch_size=4))


# --- the reconstruction objective, exactly, on Gaussian mixtures (Theorem 1's setting) ---------------------
DIM = 16
DATA = GaussianMixture.random(3, DIM, seed=1)
_OTHER = GaussianMixture.random(3, DIM, seed=2)
MODEL = GaussianMixture(DATA.means + 0.3 * _OTHER.means, _OTHER.stds, _OTHER.weights)


def gmm_setting(n, sigma_value, seed):
    ms = tiny_model("EPS").model.model_sampling
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(DATA.weights, n, replacement=True, generator=g)
    x0 = (DATA.means[k] + DATA.stds[k, None] * torch.randn(n, DIM, generator=g, dtype=torch.float64)).reshape(n, 4, 2, 2)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = torch.full((n,), sigma_value, dtype=torch.float64)
    one = torch.ones(n, dtype=torch.float64)

    def ratio(scale):
        return lambda x: scale * (DATA.log_density(x.flatten(1), sigma, one) - MODEL.log_density(x.flatten(1), sigma, one))

    def denoiser(x, s):
        return MODEL.posterior_mean(x.flatten(1), s, one).reshape(x.shape)
    return ms, x0, sigma, eps, ratio, denoiser


def test_reconstruction_error_with_the_exact_ratio_is_the_data_denoisers():
    """With the true log ratio, D + σ²∇log r is the data's posterior mean (Theorem 1), so the objective's guided
    error is exactly that of the data's own denoiser; the model's error is larger."""
    ms, x0, sigma, eps, ratio, denoiser = gmm_setting(64, 0.7, seed=3)
    guided, base = objectives.reconstruction_errors(ms, x0, sigma, eps, ratio(1.0), denoiser, logit_max=1e9,
                                                    create_graph=False)
    x = x0 + sigma[:, None, None, None] * eps
    data_d = DATA.posterior_mean(x.flatten(1), sigma, torch.ones_like(sigma)).reshape(x.shape)
    expected = ((data_d - x0) / 0.7).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(guided, expected, rtol=1e-9, atol=1e-12)
    model_error = ((denoiser(x, sigma) - x0) / 0.7).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(base, model_error, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sigma_value", [0.3, 1.0])
def test_the_exact_ratio_minimises_the_expected_reconstruction_error(sigma_value):
    """Denoising score matching: over log r, E‖D + σ²∇log r − x0‖² is smallest at the true ratio. Scaling the ratio
    either way raises the mean over 20000 real samples."""
    ms, x0, sigma, eps, ratio, denoiser = gmm_setting(20_000, sigma_value, seed=4)

    def mean_error(scale):
        guided, base = objectives.reconstruction_errors(ms, x0, sigma, eps, ratio(scale), denoiser, 1e9, False)
        return float(guided.mean()), float(base.mean())
    exact, base = mean_error(1.0)
    assert exact < base
    for scale in (0.0, 0.7, 1.3):
        assert mean_error(scale)[0] > exact, scale


def test_clipped_log_ratio_gives_no_correction():
    ms, x0, sigma, eps, ratio, denoiser = gmm_setting(32, 0.5, seed=5)
    guided, base = objectives.reconstruction_errors(ms, x0, sigma, eps, lambda x: ratio(1.0)(x) + 1e3, denoiser,
                                                    logit_max=11.5, create_graph=False)
    torch.testing.assert_close(guided, base)


# --- training with the levers on a small real ComfyUI model ---------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from harness.bench.quality import digits_split
    x_train, _, _ = digits_split()
    g = torch.Generator().manual_seed(0)
    fake = (x_train[:200] + 0.6 * torch.randn(200, 1, 8, 8, generator=g)).clamp(-1, 1)
    return tiny_model("EPS", family="Digits", attention=False), x_train[:200], fake


@pytest.mark.slow   # trains
def test_reconstruction_training_lowers_the_heldout_error(digits):
    model, real, fake = digits
    prompt = prompt_conds(model, empty_conditioning(model)[0], (1, 8, 8))
    cfg = TrainConfig(steps=40, batch_size=32, eval_every=20, patience=0, objective="reconstruction",
                      sigma_sampling="vp_importance", flip=False, width=32, learning_rate=1e-3)
    trainer = Trainer(model, real, fake, cfg, prompt=prompt)
    disc = trainer.run()
    first, best = trainer.history[0], min(trainer.history, key=lambda r: r["criterion"])
    # The untrained head's correction is near zero (gain ≈ 0); training makes it help on held-out real data.
    assert abs(first["recon_gain"]) < 0.5 * best["recon_gain"]
    assert best["recon_gain"] > 0
    assert disc.info.training["heldout_recon_gain"] == pytest.approx(best["recon_gain"], abs=1e-5)
    assert disc.info.training["config"]["objective"] == "reconstruction"


@pytest.mark.slow   # trains
def test_width_and_sigma_sampling_reach_the_network_and_the_file(digits):
    model, real, fake = digits
    cfg = TrainConfig(steps=2, batch_size=16, eval_every=2, patience=0, width=48, sigma_sampling="vp_importance")
    disc = Trainer(model, real, fake, cfg).run()
    assert disc.config()["width"] == 48 and disc.proj.out_channels == 48
    assert disc.info.training["config"]["sigma_sampling"] == "vp_importance"
