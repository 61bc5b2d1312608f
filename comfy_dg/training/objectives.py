"""What a discriminator is trained to minimise.

"bce": the paper's cross-entropy, real = 1, fake = 0. At its optimum d/(1−d) = p_data/p_model, but a
discriminator can reach a low cross-entropy with a gradient ∇ₓ log r that is wrong, and guidance uses only that
gradient (Verine et al., "Improving Discriminator Guidance in Diffusion Models", arXiv 2503.16117, who show that
an overfitting cross-entropy discriminator can raise the KL divergence it should lower).

"reconstruction": their remedy as we read it: train log r so that the guided denoiser at w = 1,
D'(x, σ) = D(x, σ) + σ²/α·∇ₓ log r(x, σ), reconstructs the real data, i.e. denoising score matching of the
corrected score s_θ + ∇ log r on real latents. Its error is written ε-weighted,

    ‖α/σ·(D' − x0)‖² = ‖α/σ·(D − x0) + σ·∇ₓ log r‖²,   x = α·x0 + σ·ε,

the weighting of the model's own ε-prediction loss; with σ drawn by the paper's VP importance sampling (density
∝ g²/σ²) it is the likelihood weighting that bounds KL(p_data ‖ p_guided). Fakes play no part. The loss needs
∇ₓ log r inside the graph (a second-order backward through the discriminator, and through the frozen network
for the features architecture).
"""
import torch
import torch.nn.functional as F

from .. import parameterization


def bce(logit, labels, reduction="mean"):
    """The paper's loss: binary cross-entropy of the logit log(d/(1−d)), real = 1."""
    return F.binary_cross_entropy_with_logits(logit, labels, reduction=reduction)


def reconstruction_errors(model_sampling, x0, sigma, eps, log_ratio, denoiser, logit_max, create_graph):
    """(error with the correction, error without it), per sample: the ε-weighted squared error of the guided
    denoiser D' (w = 1) and of the model's own D on real latents x0, averaged over elements.

    log_ratio(x) -> logit (B,) is the discriminator on the sampler-space state x; denoiser(x, σ) -> D(x, σ)."""
    x = model_sampling.noise_scaling(sigma, eps, x0).detach().requires_grad_(True)
    logit = log_ratio(x)
    # As guiding does: log r clipped (d in [1e-5, 1 − 1e-5]), no gradient beyond.
    (grad,) = torch.autograd.grad(logit.clamp(-logit_max, logit_max).sum(), x, create_graph=create_graph)
    with torch.no_grad():
        denoised = denoiser(x.detach(), sigma).to(x0.dtype)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    alpha = parameterization.alpha(model_sampling, sigma, floor=0.0).reshape(shape)
    s = sigma.reshape(shape)
    residual = alpha / s * (denoised - x0)              # the model's own ε-weighted error
    # α/σ·(σ²/α·∇ log r), with σ²/α floored as guiding floors it (parameterization.ALPHA_MIN)
    guided = residual + s * alpha / alpha.clamp_min(parameterization.ALPHA_MIN) * grad
    return guided.pow(2).flatten(1).mean(1), residual.pow(2).flatten(1).mean(1)
