"""Gaussian mixtures with exact posterior means and densities under x = α·x0 + σ·ε (Theorem 1's setting)."""
import math

import torch


class GaussianMixture:
    def __init__(self, means, stds, weights):
        self.means, self.stds, self.weights = means, stds, weights   # (K, D), (K,), (K,)

    @classmethod
    def random(cls, k, dim, seed):
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(k, dim, generator=g, dtype=torch.float64)
        stds = 0.3 + 0.3 * torch.rand(k, generator=g, dtype=torch.float64)
        weights = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
        return cls(means, stds, weights)

    def _params(self, x):
        """The mixture's parameters on x's device, in x's dtype (the math runs in the caller's precision)."""
        return self.means.to(x), self.stds.to(x), self.weights.to(x)

    def _components(self, x, sigma, alpha):
        """log π_k + log N(x; α μ_k, v_k I) and v_k, for x (B, D), σ and α (B,)."""
        means, stds, weights = self._params(x)
        v = alpha[:, None] ** 2 * stds[None] ** 2 + sigma[:, None] ** 2               # (B, K)
        diff = x[:, None, :] - alpha[:, None, None] * means[None]                     # (B, K, D)
        d = x.shape[1]
        logp = -0.5 * (diff ** 2).sum(-1) / v - 0.5 * d * torch.log(2 * math.pi * v)
        return weights.log()[None] + logp, v, diff

    def log_density(self, x, sigma, alpha):
        logp, _, _ = self._components(x, sigma, alpha)
        return torch.logsumexp(logp, dim=1)

    def posterior_mean(self, x, sigma, alpha):
        logp, v, diff = self._components(x, sigma, alpha)
        means, stds, _ = self._params(x)
        gamma = torch.softmax(logp, dim=1)                                            # (B, K)
        gain = alpha[:, None] * stds[None] ** 2 / v                                    # (B, K)
        mean_k = means[None] + gain[..., None] * diff                                  # (B, K, D)
        return (gamma[..., None] * mean_k).sum(1)

    def sample_noisy(self, n, sigma, alpha, seed):
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        x0 = self.means[k] + self.stds[k, None] * torch.randn(n, self.means.shape[1], generator=g, dtype=torch.float64)
        return alpha[:, None] * x0 + sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
