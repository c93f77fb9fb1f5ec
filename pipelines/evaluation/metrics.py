"""Evaluation metrics shared by the training loop (rank 0) and ``pipelines/evaluate.py``: sample
grids (any sampler of ``diffusion_core.generate``), the estimated and the exact held-out bound in
bits/dim, and the per-timestep plot. All of the diffusion math is ``diffusion_core``'s; this only
batches, seeds and formats.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from diffusion_core.bound import strata_bounds
from diffusion_core.generate import SamplerSettings, generate, seeded_generator
from diffusion_core.guidance import GuidanceInterval, with_class_labels
from diffusion_core.images import encode_png, make_grid
from pipelines.evaluation.blocks import block_range, block_seed, num_blocks


def class_balanced_labels(num_images: int, classes: Sequence[int], start: int = 0) -> torch.Tensor:
    """The labels of sample indices ``start .. start + num_images - 1`` of a class-balanced draw:
    index i gets ``classes[i % len(classes)]``; int64 ``[num_images]`` on the CPU.

    Raises:
        ValueError: if ``classes`` is empty.
    """
    if len(classes) == 0:
        raise ValueError("class_balanced_labels needs at least one class")
    index = np.arange(start, start + num_images) % len(classes)
    return torch.from_numpy(np.asarray(classes, dtype=np.int64)[index])


def class_grid_labels(classes: Sequence[int], per_class: int) -> torch.Tensor:
    """Labels of a grid with one row per class: ``per_class`` copies of each of ``classes`` in turn,
    int64 ``[len(classes) * per_class]`` (tile it with ``nrow=per_class``)."""
    return torch.as_tensor(list(classes), dtype=torch.int64).repeat_interleave(per_class)


def sample_grid(
    diffusion: Any, model: torch.nn.Module, image_shape: tuple[int, int, int], num_images: int,
    settings: SamplerSettings, seed: int, class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
    nrow: int | None = None, guidance_interval: GuidanceInterval | None = None,
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
        class_labels: for a class-conditional model, int64 ``[N]`` in [-1, K), sampled with
            classifier-free guidance at ``guidance_scale`` (``generate``'s, Ho & Salimans 2022: s = 1
            the conditional model, s = 0 the unconditional one, else two network evaluations per
            call); ``None``: the model as it is.
        nrow: images per grid row (default ceil(sqrt(N))); a per-class grid uses its ``per_class``.
        guidance_interval: with ``class_labels``, ``(sigma_lo, sigma_hi)``, 0 <= sigma_lo <
            sigma_hi (``inf`` allowed): guide only the timesteps with sigma_lo < sigma_t <=
            sigma_hi, sigma_t = sqrt(1 / abar_t - 1), and use the conditional model (one network
            evaluation per image) at the others (Kynkaanniemi et al. 2024, "Applying Guidance in a
            Limited Interval Improves Sample and Distribution Quality in Diffusion Models";
            ``generate``'s); ``None``: guide every timestep.

    Returns:
        ``(images, png)``: float32 ``[N, C, H, W]`` (in [-1, 1] when ``settings.clip_denoised``)
        on CPU, and the grid as PNG bytes.

    Raises:
        ValueError: from the sampler on settings that do not fit the diffusion (num_steps > T),
            or on bad labels, guidance scale or (with labels) guidance interval, naming it.
    """
    images = generate(diffusion, model, (num_images, *image_shape), settings, generator=seeded_generator(seed),
                      class_labels=class_labels, guidance_scale=guidance_scale,
                      guidance_interval=guidance_interval).float().cpu()
    return images, encode_png(make_grid(images, nrow=nrow))


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


def bound_blocks(
    diffusion: Any, model: Any, images: torch.Tensor, num_samples: int, seed: int, block_size: int,
    blocks: np.ndarray | None = None, class_labels: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """The bound of each image of the given blocks of ``images``, one core call per block.

    Block b holds images ``[b * block_size, ...)`` (``blocks.block_range``) and draws its
    timesteps and noise from a generator seeded with ``block_seed(seed, b)``, so an image's
    figures depend on (model, images, K, block_size, seed), not on which process computes the
    block (``split_bound`` spreads the blocks over Ray actors).

    Args:
        diffusion: a ``GaussianDiffusion``; model: its network, on ``images``' device.
        images: ``[M, C, H, W]`` float32 in [-1, 1] (pixels k/127.5 - 1), the whole scored set.
        num_samples: K >= 2 for the stratified estimate (``calc_bpd_estimate``, Ho et al. 2020
            eq. 5 with K of the T terms), 0 for the exact bound (``calc_bpd_loop``, all T terms).
        blocks: block ids (default: all blocks of ``images``).
        class_labels: for a class-conditional model, int64 ``[M]`` in [-1, K), one per image: the
            bound is then on -log p(x | y) for the labelled rows and on -log p(x) for rows of -1
            (``diffusion_core.guidance.with_class_labels``, no guidance); ``None``: the model as it
            is (a conditional model then sees "no label" everywhere, the bound on -log p(x)).

    Returns:
        numpy arrays, one row per image of the blocks, in block order: "index" int64 [n],
        "total_bpd" and "prior_bpd" float64 [n] (bits/dim; prior = L_T); with K: "stderr" [n]
        and "stratum_bpd" [n, H] (see ``calc_bpd_estimate``); exact: "vb" [n, T] (column 0 = L_0).

    Raises:
        ValueError: from the core on a bad K or image batch.
    """
    total = images.shape[0]
    ids = np.arange(num_blocks(total, block_size)) if blocks is None else np.asarray(blocks, dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for block in ids.tolist():
            start, count = block_range(block, block_size, total)
            x = images[start : start + count]
            network = model if class_labels is None else with_class_labels(
                model, class_labels[start : start + count].to(x.device))
            generator = torch.Generator(device=x.device).manual_seed(block_seed(seed, block))
            if num_samples:
                out = diffusion.calc_bpd_estimate(network, x, num_samples=num_samples, generator=generator)
                keys = ("total_bpd", "prior_bpd", "stderr", "stratum_bpd")
            else:
                out = diffusion.calc_bpd_loop(network, x, generator=generator)
                keys = ("total_bpd", "prior_bpd", "vb")
            parts.setdefault("index", []).append(np.arange(start, start + count, dtype=np.int64))
            for key in keys:
                parts.setdefault(key, []).append(out[key].double().cpu().numpy())
    return {key: np.concatenate(chunks) for key, chunks in parts.items()}


def _images_stderr(total_bpd: np.ndarray) -> float:
    """Standard error of the mean over images drawn from a larger set: sample std / sqrt(n)
    (NaN for one image). It holds the spread between images and the timestep sampling."""
    n = total_bpd.shape[0]
    return float(total_bpd.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")


def summarize_estimate(rows: dict[str, np.ndarray], num_timesteps: int, num_samples: int) -> dict[str, Any]:
    """The estimated bound of the images of ``bound_blocks(..., num_samples=K)`` rows, in bits/dim.

    Returns:
        "bpd": mean total; "bpd_stderr": its standard error from the timestep sampling on this
        fixed set of images (sqrt(sum_i se_i^2) / n); "bpd_stderr_images": the standard error as
        an estimate of the mean of a larger set these images are drawn from (``_images_stderr``);
        "prior_bpd" (L_T, exact), "decoder_bpd" (L_0; ``None`` when K < 4, where t = 0 shares a
        stratum), "terms_bpd" (sum of L_t, t = 1 .. T-1, 0-based); "per_t": float64 [T], each
        stratum's mean sum spread evenly over its timesteps (the estimate's per-timestep
        profile); "images": n.
    """
    total, stratum = rows["total_bpd"], rows["stratum_bpd"].mean(axis=0)
    strata = strata_bounds(num_timesteps, num_samples // 2)
    per_t = np.repeat(stratum / np.diff(strata), np.diff(strata))
    alone = strata[1] == 1
    return {"bpd": float(total.mean()), "bpd_stderr": float(np.sqrt((rows["stderr"] ** 2).sum()) / total.shape[0]),
            "bpd_stderr_images": _images_stderr(total), "prior_bpd": float(rows["prior_bpd"].mean()),
            "decoder_bpd": float(stratum[0]) if alone else None,
            "terms_bpd": float(stratum[1:].sum()) if alone else None, "per_t": per_t, "images": int(total.shape[0])}


def summarize_exact(rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """The exact bound of the images of ``bound_blocks(..., num_samples=0)`` rows, in bits/dim.

    Returns:
        "bpd": mean total; "bpd_stderr_images" (as in :func:`summarize_estimate`); "prior_bpd"
        (L_T); "decoder_bpd" (L_0); "terms_bpd" (sum of L_t, t = 1 .. T-1); "vb_per_t": float64
        numpy [T], mean bits/dim of each term (index 0 = L_0); "images": n.
    """
    vb_per_t = rows["vb"].mean(axis=0)
    return {"bpd": float(rows["total_bpd"].mean()), "bpd_stderr_images": _images_stderr(rows["total_bpd"]),
            "prior_bpd": float(rows["prior_bpd"].mean()), "decoder_bpd": float(vb_per_t[0]),
            "terms_bpd": float(vb_per_t[1:].sum()), "vb_per_t": vb_per_t, "images": int(rows["vb"].shape[0])}


def estimate_bpd(
    diffusion: Any, model: Any, images: torch.Tensor, num_samples: int, seed: int, batch_size: int = 64,
    class_labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The stratified K-sample estimate of the full bound (prior included; Ho et al. 2020 eq. 5)
    over ``images`` ``[N, C, H, W]`` in [-1, 1] (on the model's device), in blocks of
    ``batch_size`` (:func:`bound_blocks`; ``class_labels`` [N] as there: the bound on
    -log p(x | y) of a conditional model).

    Returns:
        :func:`summarize_estimate`'s dict: "bpd" (mean total bits/dim), "bpd_stderr" (from the
        timestep sampling on this fixed subset of images), the L_T / L_0 / sum L_t split, ...

    Raises:
        ValueError: on K outside [2, 2T].
    """
    rows = bound_blocks(diffusion, model, images, num_samples, seed, batch_size, class_labels=class_labels)
    return summarize_estimate(rows, diffusion.num_timesteps, num_samples)


def exact_bpd(
    diffusion: Any, model: Any, images: torch.Tensor, seed: int, batch_size: int = 64,
    class_labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The exact bound by ``calc_bpd_loop`` (all T terms + the prior; Ho et al. 2020 eq. 5) over
    ``images`` ``[N, C, H, W]`` (on the model's device), in blocks of ``batch_size``
    (``class_labels`` [N] as in :func:`bound_blocks`).

    Returns:
        :func:`summarize_exact`'s dict: "bpd" (mean total bits/dim), "prior_bpd",
        "vb_per_t" (float64 numpy [T], index 0 = decoder L_0), the L_0 / sum L_t split, ...
    """
    return summarize_exact(bound_blocks(diffusion, model, images, 0, seed, batch_size, class_labels=class_labels))


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
