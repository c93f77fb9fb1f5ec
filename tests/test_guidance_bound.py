"""The bound of a class-conditional model: ``with_class_labels`` gives calc_bpd_loop /
calc_bpd_estimate the bound on -log p(x | y), and with every label -1 the bound on -log p(x).

On the two-class Gaussian data of ``_class_gaussians`` (exact denoisers; classes 12 standard
deviations apart, so p(y | x) is 1 to within 1e-30) the true difference
-log p(x) + log p(x | y) = -log p(y) = -log WEIGHTS[y], i.e. -log2(WEIGHTS[y]) / D bits/dim. The two
bounds' gaps are not equal (the mixture's reverse steps are not Gaussian, its bound is looser), so the
difference of the bounds is compared with that value within 5 standard errors (the two loops share
their noise draws) plus an allowance of 0.0015 bits/dim (0.1 bits per 64-pixel image) for the
unequal gaps; a mixture with weights 0.5 / 0.5 instead of 0.7 / 0.3 would move the expected values by
+0.0076 and -0.0115 bits/dim.
"""

from __future__ import annotations

import math

import torch
from _class_gaussians import MEANS, WEIGHTS, ExactClassGaussians
from _diffusion_helpers import single_thread  # noqa: F401 (autouse fixture)
from _gaussian_chain import S

from diffusion_core import DiffusionConfig, GaussianDiffusion
from diffusion_core.guidance import NO_LABEL, with_class_labels

T = 200
N = 256
PIXELS = 64


def _data(labels: torch.Tensor) -> torch.Tensor:
    """Images of the labels' classes on the 256-level grid, float64 [N, 1, 8, 8]."""
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor(MEANS, dtype=torch.float64)[labels].reshape(-1, 1, 1, 1)
    x = (mean + S * torch.randn(labels.shape[0], 1, 8, 8, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return torch.round((x + 1) * 127.5) / 127.5 - 1


def test_label_information_from_the_exact_bounds():
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=T))
    model = ExactClassGaussians(d)
    labels = torch.arange(N) % 2
    x = _data(labels)
    conditional = d.calc_bpd_loop(with_class_labels(model, labels), x, generator=torch.Generator().manual_seed(1))
    unconditional = d.calc_bpd_loop(with_class_labels(model, torch.full_like(labels, NO_LABEL)), x,
                                    generator=torch.Generator().manual_seed(1))
    difference = (unconditional["total_bpd"] - conditional["total_bpd"]).double()
    for k in (0, 1):
        values = difference[labels == k]
        stderr = values.std().item() / math.sqrt(values.numel())
        information = -math.log2(WEIGHTS[k]) / PIXELS
        assert abs(values.mean().item() - information) < 5 * stderr + 0.0015, (k, values.mean(), information)
    assert model.batch_sizes == [N] * (2 * T)  # unguided: one call of N rows per term


def test_estimate_takes_the_same_wrapper():
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=T))
    labels = torch.tensor([0, 1, NO_LABEL, 0])
    x = _data(labels.clamp(min=0))
    model = ExactClassGaussians(d)
    estimate = d.calc_bpd_estimate(with_class_labels(model, labels), x, num_samples=8,
                                   generator=torch.Generator().manual_seed(2))
    assert estimate["total_bpd"].shape == (4,) and torch.isfinite(estimate["total_bpd"]).all()
    assert model.calls == 8
