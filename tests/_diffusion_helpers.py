"""Small models and data for the diffusion-math tests (no UNet needed)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import torch

from diffusion_core.diffusion import GaussianDiffusion


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Run each test with one torch thread (restored afterwards): the tensors here are tiny, and
    on a shared 2-core machine intra-op threads make them 10-30x slower instead of faster.
    Test modules activate it by importing it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def grid_images(shape: tuple[int, ...], seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Random images [N, C, H, W] on the 256-level grid k/127.5 - 1, including both end values."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, shape, generator=g)
    k.view(-1)[0], k.view(-1)[-1] = 0, 255
    return (k.to(torch.float64) / 127.5 - 1.0).to(dtype)


class ConvModel(torch.nn.Module):
    """A nontrivial, deterministic model: a 3x3 convolution of x_t plus a timestep-dependent bias."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, seed: int = 0, scale: float = 0.3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(scale * torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(scale * torch.randn(self.conv.bias.shape, generator=g))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)) + 0.1 * torch.cos(t.to(x.dtype) / 7.0).reshape(-1, 1, 1, 1)


class OracleEps:
    """The exact eps-predictor for a data set holding the single image ``x0`` [1 or N, C, H, W]:
    eps(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), coefficients in float64.
    ``extra_channels`` appends a constant to emulate learned_range outputs."""

    def __init__(self, diffusion: GaussianDiffusion, x0: torch.Tensor, extra_channels: float | None = None) -> None:
        self.abar = torch.from_numpy(diffusion.alphas_cumprod)
        self.x0 = x0.to(torch.float64)
        self.extra = extra_channels
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(t.tolist()))
        abar = self.abar[t].reshape(-1, 1, 1, 1)
        eps = (x_t.to(torch.float64) - abar.sqrt() * self.x0) / (1.0 - abar).sqrt()
        if self.extra is not None:
            eps = torch.cat([eps, torch.full_like(eps, self.extra)], dim=1)
        return eps.to(x_t.dtype)


class CountingModel:
    """Wraps a model and records the timestep tensor of every call."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls: list[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.clone())
        return self.model(x_t, t)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """The linear schedule written out independently of diffusion_core (float64)."""
    scale = 1000.0 / num_timesteps
    return np.linspace(1e-4 * scale, 0.02 * scale, num_timesteps, dtype=np.float64)
