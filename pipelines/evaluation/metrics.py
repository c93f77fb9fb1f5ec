"""Evaluation metrics shared by the training loop (rank 0) and ``pipelines/evaluate.py``: sample
grids (any sampler of ``diffusion_core.generate``), the estimated and the exact held-out bound in
bits/dim, and the per-timestep plot. All of the diffusion math is ``diffusion_core``'s; this only
batches, seeds and formats.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from diffusion_core.generate import SamplerSettings, generate, seeded_generator
from diffusion_core.images import encode_png, make_grid


def sample_grid(
    diffusion: Any, model: torch.nn.Module, image_shape: tuple[int, int, int], num_images: int,
    settings: SamplerSettings, seed: int,
) -> tuple[torch.Tensor, bytes]:
    """Draw ``num_images`` samples with ``settings`` (``diffusion_core.generate.generate``) and
    tile them.

    Args:
        diffusion: a ``GaussianDiffusion``.
        model: the network (in eval mode), on its device.
        image_shape: ``(C, H, W)``.
        num_images: N >= 1.
        settings: the sampler and its parameters (``num_steps`` in [1, T]); training's and
            ``evaluate.py``'s default is ``SamplerSettings("ddim", S)``: DDIM, eta = 0, clipped.
        seed: seed of the CPU generator that draws the initial (and any per-step) noise.

    Returns:
        ``(images, png)``: float32 ``[N, C, H, W]`` (in [-1, 1] when ``settings.clip_denoised``)
        on CPU, and the grid as PNG bytes.

    Raises:
        ValueError: from the sampler on settings that do not fit the diffusion (num_steps > T).
    """
    images = generate(diffusion, model, (num_images, *image_shape), settings,
                      generator=seeded_generator(seed)).float().cpu()
    return images, encode_png(make_grid(images))


def sampler_params(settings: SamplerSettings, num_timesteps: int, prefix: str = "sample_") -> dict[str, Any]:
    """MLflow params describing ``settings`` for a model with T = ``num_timesteps``:
    ``{prefix + name: value}`` for each of ``settings.params()``, with ``num_steps`` named
    ``<prefix>steps`` (the key evaluations logged before other samplers existed; T for "ddpm"),
    plus ``<prefix>network_evaluations`` per image.

    Raises:
        ValueError: if ``settings.num_steps`` is more than T (see ``SamplerSettings.network_evaluations``).
    """
    params = {f"{prefix}{name}": value for name, value in settings.params().items() if name != "num_steps"}
    params[f"{prefix}steps"] = settings.num_steps if "num_steps" in settings.uses() else num_timesteps
    params[f"{prefix}network_evaluations"] = settings.network_evaluations(num_timesteps)
    return params


def _batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]


def estimate_bpd(
    diffusion: Any, model: torch.nn.Module, images: torch.Tensor, num_samples: int, seed: int, batch_size: int = 64
) -> dict[str, float]:
    """Mean of ``calc_bpd_estimate`` (stratified K-sample estimate of the full bound, prior
    included; Ho et al. 2020 eq. 5) over ``images``.

    Args:
        images: validation images ``[N, C, H, W]`` in [-1, 1], on the model's device.
        num_samples: K timesteps per image.

    Returns:
        ``{"bpd": mean total bits/dim, "bpd_stderr": standard error of that mean from the timestep
        sampling on this fixed subset of images (bits/dim)}``.
    """
    generator = torch.Generator().manual_seed(seed)
    totals, variances = [], []
    with torch.no_grad():
        for chunk in _batches(images, batch_size):
            out = diffusion.calc_bpd_estimate(model, chunk, num_samples=num_samples, generator=generator)
            totals.append(out["total_bpd"].double().cpu())
            variances.append(out["stderr"].double().cpu() ** 2)
    total, var = torch.cat(totals), torch.cat(variances)
    # Images are a fixed subset, so only the timestep sampling is random: Var(mean) = sum var_i / n^2.
    return {"bpd": float(total.mean()), "bpd_stderr": float(torch.sqrt(var.sum()) / total.numel())}


def exact_bpd(
    diffusion: Any, model: torch.nn.Module, images: torch.Tensor, seed: int, batch_size: int = 64
) -> dict[str, Any]:
    """The exact bound by ``calc_bpd_loop`` (all T terms + the prior; Ho et al. 2020 eq. 5) over
    ``images`` ``[N, C, H, W]`` (on the model's device).

    Returns:
        ``{"bpd": mean total bits/dim (float), "prior_bpd": mean prior term (float),
        "vb_per_t": float64 numpy [T], mean bits/dim of each term L_t (index 0 = decoder L_0)}``.
    """
    generator = torch.Generator().manual_seed(seed)
    totals, priors, vbs = [], [], []
    with torch.no_grad():
        for chunk in _batches(images, batch_size):
            out = diffusion.calc_bpd_loop(model, chunk, generator=generator)
            totals.append(out["total_bpd"].double().cpu())
            priors.append(out["prior_bpd"].double().cpu())
            vbs.append(out["vb"].double().cpu())
    return {
        "bpd": float(torch.cat(totals).mean()),
        "prior_bpd": float(torch.cat(priors).mean()),
        "vb_per_t": torch.cat(vbs).mean(dim=0).numpy(),
    }


def plot_bpd_terms(vb_per_t: np.ndarray, prior_bpd: float, title: str) -> bytes:
    """A log-scale line plot of bits/dim per timestep term (x: 0-based t, index 0 = L_0), with the
    prior term noted in the legend; PNG bytes (matplotlib, Agg backend)."""
    figure = Figure(figsize=(6, 3.5), dpi=100)
    axes = figure.subplots()
    axes.plot(np.arange(len(vb_per_t)), vb_per_t, label=f"L_t (sum {vb_per_t.sum():.3f}); prior {prior_bpd:.2e}")
    axes.set_yscale("log")
    axes.set_xlabel("timestep t (0-based; 0 = decoder L_0)")
    axes.set_ylabel("bits/dim")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
