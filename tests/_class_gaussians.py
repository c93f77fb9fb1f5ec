"""Two-class Gaussian data and its exact class-conditional and unconditional denoisers, for the
classifier-free guidance tests.

Class k in {0, 1} has prior weight ``WEIGHTS[k]`` and images N(MEANS[k], S^2 I) (every pixel the same
mean; S and MU from ``_gaussian_chain``, MEANS = (+MU, -MU)). At level t the class's marginal is
q(x_t | k) = N(sqrt(abar_t) m_k, sigma_t^2 I), sigma_t^2 = abar_t S^2 + 1 - abar_t, so

    eps*(x_t, t, k) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) m_k) / sigma_t^2     (the class's Gaussian denoiser)
    eps*(x_t, t)    = sum_k p(k | x_t) eps*(x_t, t, k),                          (the mixture's)
    p(k | x_t)     ~ WEIGHTS[k] exp(-||x_t - sqrt(abar_t) m_k||^2 / (2 sigma_t^2)),

because E[eps | x_t] = sum_k p(k | x_t) E[eps | x_t, k]. :class:`ExactClassGaussians` is that pair as a
class-conditional network ``model(x_t, t, class_labels)`` with -1 = the mixture.
"""

from __future__ import annotations

import torch
from _gaussian_chain import MU, S
from torch import nn

from diffusion_core import GaussianDiffusion
from diffusion_core.guidance import check_class_labels

MEANS = (MU, -MU)
WEIGHTS = (0.7, 0.3)


class ExactClassGaussians(nn.Module):
    """The exact denoiser of the two-class data in ``diffusion.config.prediction``'s form:
    ``(x_t float [N, C, H, W], t int64 [N], class_labels int64 [N] in [-1, 2) or None) -> [N, C, H, W]``
    in x_t's dtype (float64 inside); -1 (or None) rows get the mixture's. ``calls`` counts the calls and
    ``batch_sizes`` records N of each."""

    num_classes = 2

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        super().__init__()
        self.diffusion = diffusion
        self.abar = torch.from_numpy(diffusion.alphas_cumprod)
        self.calls = 0
        self.batch_sizes: list[int] = []

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """eps*(x_t, t, y) in float64 [N, C, H, W]."""
        n = x_t.shape[0]
        labels = torch.full((n,), -1, dtype=torch.long) if class_labels is None else class_labels
        check_class_labels(labels, n, self.num_classes)
        abar = self.abar[t].reshape(-1, 1, 1, 1)
        x = x_t.double()
        sigma2 = abar * S**2 + 1 - abar
        means = torch.tensor(MEANS, dtype=torch.float64).reshape(-1, 1, 1, 1, 1)
        residual = x.unsqueeze(0) - abar.sqrt().unsqueeze(0) * means           # [K, N, C, H, W]
        eps_k = (1 - abar).sqrt() * residual / sigma2
        log_post = torch.log(torch.tensor(WEIGHTS, dtype=torch.float64)).reshape(-1, 1) - (
            residual.pow(2).sum(dim=(2, 3, 4)) / (2 * sigma2.reshape(1, -1)))  # [K, N]
        post = torch.softmax(log_post, dim=0).reshape(*log_post.shape, 1, 1, 1)
        mixture = (post * eps_k).sum(dim=0)
        chosen = eps_k[labels.clamp(min=0), torch.arange(n)]
        return torch.where((labels < 0).reshape(-1, 1, 1, 1), mixture, chosen)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.batch_sizes.append(x_t.shape[0])
        eps = self.eps(x_t, t, class_labels)
        return self.diffusion.output_from_eps(x_t.double(), t, eps).to(x_t.dtype)
