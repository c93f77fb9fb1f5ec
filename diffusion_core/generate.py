"""One entry point for drawing images with any of the core's samplers, chosen by name.

Every place that samples (training's sample grids, ``pipelines/evaluate.py``, the MLflow pyfunc,
the Serve replica) describes what to run as a :class:`SamplerSettings` and calls :func:`generate`,
so a sampler added to ``GaussianDiffusion`` is offered everywhere by adding it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from diffusion_core.diffusion import Model
from diffusion_core.rng import Generator
from diffusion_core.validation import check_choice, check_number_in, check_positive_int

SamplerName = Literal["ddpm", "ddim"]


@dataclass(frozen=True)
class SamplerSettings:
    """Which sampler to run and how.

    Attributes:
        sampler: "ddpm" (ancestral, Ho et al. 2020 Alg. 2; always T steps) or "ddim" (Song et al.
            2021 eq. 12 over ``num_steps`` evenly spaced timesteps).
        num_steps: network evaluations per image for "ddim" (1..T); ignored by "ddpm".
        eta: DDIM's stochasticity (0 = deterministic); ignored by "ddpm".
        clip_denoised: clamp the predicted x_0 to [-1, 1] at every step.

    Raises:
        ValueError: on an unknown sampler, ``num_steps < 1`` or ``eta < 0``.
    """

    sampler: SamplerName = "ddim"
    num_steps: int = 50
    eta: float = 0.0
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SamplerName)
        check_positive_int("num_steps", self.num_steps)
        check_number_in("eta", self.eta, 0.0, float("inf"), high_open=True)


def generate(
    diffusion, model: Model, shape: tuple[int, int, int, int], settings: SamplerSettings,
    generator: Generator = None, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``shape`` = [N, C, H, W] images with ``settings``, without gradients.

    Args:
        diffusion: a ``GaussianDiffusion``.
        model: the network ``model(x_t, t)``, in eval mode, on ``device``.
        shape: [N, C, H, W] of the result.
        settings: the sampler and its parameters.
        generator: a ``torch.Generator`` or a ``RowGenerators`` (one generator per group of rows);
            the same seed gives the same images on the same hardware.
        device: where to sample (default: the sampler's default).

    Returns:
        float32 [N, C, H, W] (in [-1, 1] when ``clip_denoised``), on ``device``.

    Raises:
        ValueError: from the sampler on values that do not fit the diffusion (e.g. num_steps > T).
    """
    with torch.no_grad():
        if settings.sampler == "ddpm":
            return diffusion.p_sample_loop(
                model, shape, generator=generator, clip_denoised=settings.clip_denoised, device=device
            )
        return diffusion.ddim_sample_loop(
            model, shape, num_steps=settings.num_steps, eta=settings.eta, generator=generator,
            clip_denoised=settings.clip_denoised, device=device,
        )


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """``torch.Generator(device).manual_seed(seed)``: the generator every seeded entry point uses."""
    return torch.Generator(device=device).manual_seed(int(seed))
