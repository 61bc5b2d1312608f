"""An analytic model for exact answers: the data and the model are Gaussian mixtures (gmm.py), the model's denoiser is
its exact posterior mean installed on a real ComfyUI model, and ExactRatio is the true log p_data,σ/p_model,σ, so
Theorem 1 holds exactly and official samplers can be transcribed and compared to the float64 rounding."""
import torch

from gmm import GaussianMixture
from harness.tiny import tiny_model
from probe import evaluate as probe_evaluate

SHAPE = (4, 2, 2)
DIM = 16
DATA = GaussianMixture.random(3, DIM, seed=1)
# The model: the data's mixture with shifted means, other spreads and weights (wrong, but not absurdly so).
_OTHER = GaussianMixture.random(3, DIM, seed=2)
MODEL = GaussianMixture(DATA.means + 0.3 * _OTHER.means, _OTHER.stds, _OTHER.weights)
# σ at which each model type is checked (the model's σ range, noisy to clean).
SIGMAS = {"EPS": [14.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.05], "V_PREDICTION": [10.0, 3.0, 1.0, 0.3, 0.05],
          "EDM": [40.0, 5.0, 1.0, 0.2, 0.05], "FLOW": [0.9, 0.7, 0.5, 0.3, 0.1, 0.02]}


def alpha_of(model_type, sigma):
    # Written out per type here, independently of comfy_dg.parameterization, which it checks.
    return 1.0 - sigma if model_type == "FLOW" else torch.ones_like(sigma)


class ExactRatio(torch.nn.Module):
    """log r = log p_data,σ(x) − log p_model,σ(x), seen through the network's input scaling x_in = c_in·x."""

    def __init__(self, model_sampling, model_type):
        super().__init__()
        self.ms, self.model_type = model_sampling, model_type

    def forward(self, x_in, sigma):
        c_in = self.ms.calculate_input(sigma, torch.ones_like(x_in))
        x = (x_in / c_in).flatten(1)
        a = alpha_of(self.model_type, sigma)
        return DATA.log_density(x, sigma, a) - MODEL.log_density(x, sigma, a)


def evaluate(model_patcher, points, cfg):
    shaped = [(sigma, x.reshape(-1, *SHAPE)) for sigma, x in points]
    return [(sigma, x.reshape(x.shape[0], -1), d.reshape(d.shape[0], -1))
            for sigma, x, d in probe_evaluate(model_patcher, shaped, cfg)]


def analytic_model(model_type, dtype=torch.float64):
    """A tiny ComfyUI model whose denoiser is MODEL's exact posterior mean, computed in `dtype` on x's device."""
    m = tiny_model(model_type)

    def denoiser(apply_model, args):
        x, sigma = args["input"], args["timestep"]
        xd = x.to(dtype).flatten(1)
        s = sigma.to(xd)
        return MODEL.posterior_mean(xd, s, alpha_of(model_type, s)).reshape(x.shape)
    m.set_model_unet_function_wrapper(denoiser)
    return m
