"""Class labels for a class-conditional network and classifier-free guidance (Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance").

A class-conditional network (``UNetConfig.num_classes = K``) is called ``model(x_t, t, class_labels)``
with ``class_labels`` int64 [N] in [-1, K), where -1 means "no label" (the shards' convention for an
unknown label). Trained with label dropout, one network estimates both eps(x_t, t, y), for p(x | y),
and eps(x_t, t, -1), for p(x). This module turns such a network into the plain ``(x_t, t) -> output``
callable (``diffusion_core.types.Model``) that every sampler and the bound accept:

* :func:`with_class_labels`: ``model(x_t, t, class_labels)`` with fixed labels, unguided. With it the
  bound (``calc_bpd_loop`` / ``calc_bpd_estimate``) is the bound on -log p(x | y); with every label
  -1 it is the bound on -log p(x). The difference ``bound(x) - bound(x | y)`` estimates the
  information the label carries about the image (log p(y | x) - log p(y), in bits/dim); it is an
  estimate, not a bound: both terms are upper bounds with their own, unequal gaps, so the difference
  can come out too large, too small, or negative.
* :func:`classifier_free_guidance`: the guided network of Ho & Salimans 2022, eq. 6,

      eps_guided = eps_u + s (eps_c - eps_u),   eps_c = eps(x_t, t, y), eps_u = eps(x_t, t, -1),

  with s = ``guidance_scale`` in diffusers' convention (``noise_pred_uncond + guidance_scale *
  (noise_pred_text - noise_pred_uncond)``): s = 1 is the conditional model, s = 0 the unconditional
  one, s > 1 guides; Ho & Salimans' w is s - 1.

Cost: :func:`guidance_evaluations` network evaluations per image per model call of a sampler: 1
for s in {0, 1} (a single conditional or unconditional call), else 2 (one call on the doubled
batch [2N, C, H, W]). Multiply ``SamplerSettings.network_evaluations(T)`` by it wherever costs are
counted.

A ``guidance_interval`` (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval
Improves Sample and Distribution Quality in Diffusion Models") guides only the steps whose noise
level sigma_t = sqrt(1 / abar_t - 1) (EDM's sigma of the VP chain, ``sqrt_recipm1_alphas_cumprod``)
lies in (sigma_lo, sigma_hi]; the other steps use the conditional model alone (s = 1, one
evaluation). That paper finds guidance at high noise levels harmful to diversity and of little use
at low ones; the unguided steps also cost one evaluation per image instead of two.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from diffusion_core.types import Model

if TYPE_CHECKING:  # annotation only: the UNet imports this module and needs no process
    from diffusion_core.process import DiffusionProcess

NO_LABEL = -1
"""The class label that means "no label" (the unconditional model)."""

ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``model(x_t [N, C, H, W] float, t [N] int64, class_labels [N] int64) -> [N, C_out, H, W]``."""


def check_class_labels(class_labels: torch.Tensor, batch_size: int | None, num_classes: int | None) -> None:
    """Require integer class labels [N] in [-1, num_classes) (-1 = "no label").

    Args:
        class_labels: the labels to check.
        batch_size: N, the batch the labels go with; ``None`` skips the shape-vs-batch check.
        num_classes: K of the model; ``None`` checks only the lower end (-1).

    Raises:
        TypeError: if ``class_labels`` is not a torch.Tensor.
        ValueError: naming ``class_labels``, on a shape other than [N], a non-integer dtype, or a
            value outside [-1, K) (the message gives the range).
    """
    if not isinstance(class_labels, torch.Tensor):
        raise TypeError(f"class_labels must be an int64 torch.Tensor [N], got {type(class_labels).__name__}")
    if class_labels.ndim != 1 or (batch_size is not None and class_labels.shape[0] != batch_size):
        expected = f"[N] = [{batch_size}]" if batch_size is not None else "[N]"
        raise ValueError(f"class_labels must have shape {expected}, got shape {tuple(class_labels.shape)}")
    if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be an integer (int64) tensor, got dtype {class_labels.dtype}")
    if class_labels.numel() == 0:
        return
    low, high = int(class_labels.min()), int(class_labels.max())
    if low < NO_LABEL or (num_classes is not None and high >= num_classes):
        bad = low if low < NO_LABEL else high
        allowed = f"[-1, {num_classes})" if num_classes is not None else "[-1, num_classes)"
        raise ValueError(f"class_labels has the value {bad}; labels must be in {allowed} (-1 = no label)")


def check_guidance_scale(guidance_scale: float) -> None:
    """Require a finite real number >= 0.

    Raises:
        ValueError: naming ``guidance_scale`` and the value.
    """
    is_number = isinstance(guidance_scale, numbers.Real) and not isinstance(guidance_scale, bool)
    if not (is_number and math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0")


GuidanceInterval = tuple[float, float]
"""``(sigma_lo, sigma_hi)``: guide the steps with sigma_lo < sigma_t <= sigma_hi (``inf`` allowed)."""


def check_guidance_interval(guidance_interval: GuidanceInterval) -> None:
    """Require a pair ``(sigma_lo, sigma_hi)`` of real numbers with 0 <= sigma_lo < sigma_hi
    (sigma_hi may be ``inf``; sigma_lo must be finite).

    Raises:
        ValueError: naming ``guidance_interval`` and the value.
    """
    pair = tuple(guidance_interval) if isinstance(guidance_interval, (tuple, list)) else ()
    numbers_ok = len(pair) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
    if not (numbers_ok and math.isfinite(pair[0]) and 0 <= pair[0] < pair[1] and not math.isnan(pair[1])):
        raise ValueError(f"guidance_interval={guidance_interval!r} must be (sigma_lo, sigma_hi) "
                         "with 0 <= sigma_lo < sigma_hi (sigma_hi may be inf)")


def guided_timesteps(process: DiffusionProcess, guidance_interval: GuidanceInterval | None) -> np.ndarray:
    """Which 0-based timesteps a ``guidance_interval`` guides: bool [T], True where
    sigma_lo < sigma_t <= sigma_hi with sigma_t = sqrt(1 / abar_t - 1) (Kynkaanniemi et al. 2024,
    sec. 3, in the VP chain's EDM sigma); every timestep for ``None``.

    Raises:
        ValueError: naming ``guidance_interval`` if it is not a valid interval.
    """
    sigmas = process.sqrt_recipm1_alphas_cumprod
    if guidance_interval is None:
        return np.ones(len(sigmas), dtype=bool)
    check_guidance_interval(guidance_interval)
    low, high = (float(v) for v in guidance_interval)
    return (sigmas > low) & (sigmas <= high)


def guidance_evaluations(guidance_scale: float) -> int:
    """Network evaluations per image per model call of a guided sampler: 1 for s = 0 or s = 1 (one
    unconditional or conditional call), else 2 (the doubled batch). Multiply
    ``SamplerSettings.network_evaluations(T)`` by it to count a guided run's cost.

    Raises:
        ValueError: naming ``guidance_scale`` if it is not finite and >= 0.
    """
    check_guidance_scale(guidance_scale)
    return 1 if guidance_scale in (0, 1) else 2


def model_num_classes(model: object) -> int | None:
    """K of a model that carries a ``UNetConfig`` as ``model.config`` (the ``UNet``, or a wrapper
    exposing its config), else ``None`` (unknown: labels are then range-checked by the model).

    Raises:
        ValueError: if ``model.config.num_classes`` is None: the model is unconditional and takes no
            class labels.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_classes") and config.num_classes is None:
        raise ValueError("class_labels were given, but this model is unconditional "
                         "(UNetConfig.num_classes is None); sample it without class_labels")
    return getattr(config, "num_classes", None)


def as_class_labels(class_labels: torch.Tensor | Sequence[int], num_classes: int | None = None) -> torch.Tensor:
    """``class_labels`` as an int64 tensor [N] (a tensor keeps its device; a sequence of ints goes to
    the CPU), checked to lie in [-1, num_classes).

    Raises:
        TypeError / ValueError: as :func:`check_class_labels`.
    """
    if not isinstance(class_labels, torch.Tensor):
        if isinstance(class_labels, (str, bytes)) or not isinstance(class_labels, Sequence):
            raise TypeError(f"class_labels must be an int64 tensor [N] or a sequence of ints, "
                            f"got {type(class_labels).__name__}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in class_labels):
            raise ValueError(f"class_labels={list(class_labels)!r} must be integers")
        class_labels = torch.tensor(list(class_labels), dtype=torch.long)
    check_class_labels(class_labels, None, num_classes)
    return class_labels.long()


def _labels_on_device(class_labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``x_t -> class_labels`` on ``x_t``'s device (copied there once per device, not at
    every sampler step), checked against ``x_t``'s batch size (shape only: no device sync).
    It raises ValueError naming ``class_labels`` when the batch sizes differ."""
    copies: dict[torch.device, torch.Tensor] = {}

    def labels_for(x_t: torch.Tensor) -> torch.Tensor:
        if class_labels.shape[0] != x_t.shape[0]:
            raise ValueError(f"class_labels has shape {tuple(class_labels.shape)} but x_t has batch size "
                             f"{x_t.shape[0]}; they must match")
        if x_t.device not in copies:
            copies[x_t.device] = class_labels.to(device=x_t.device)
        return copies[x_t.device]

    return labels_for


def with_class_labels(model: ConditionalModel, class_labels: torch.Tensor | Sequence[int]) -> Model:
    """The unguided ``(x_t, t) -> model(x_t, t, class_labels)`` for a conditional network.

    Use it for the bound (``calc_bpd_loop`` / ``calc_bpd_estimate``): with labels it is the bound on
    -log p(x | y), with every label -1 the bound on -log p(x); see the module docstring for what
    their difference is and is not. One network evaluation per call.

    Args:
        model: a class-conditional network (``model.config.num_classes`` is used, when present, to
            range-check the labels now).
        class_labels: int64 [N] in [-1, K), -1 = no label; N must equal the batch size of every call.

    Raises:
        ValueError: on labels out of range (now), or a batch size other than N (at call time).
    """
    labels_for = _labels_on_device(as_class_labels(class_labels, model_num_classes(model)))

    def conditioned(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x_t, t, labels_for(x_t))

    return conditioned


def guide_outputs(
    output_cond: torch.Tensor, output_uncond: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
    guidance_scale: float, process: DiffusionProcess,
) -> torch.Tensor:
    """Combine a conditional and an unconditional network output into the guided output
    (Ho & Salimans 2022, eq. 6, in diffusers' convention, see the module docstring).

    The first C channels (the ``process.config.prediction``: eps, x_start, v or score) are turned
    into eps with the process's public conversions (``xstart_and_eps_from_output``), combined as
    ``eps_u + s (eps_c - eps_u)`` and turned back (``output_from_eps``); for eps-prediction they are
    combined directly. For ``variance="learned_range"`` the last C channels (the variance
    interpolation) are the conditional output's, as in GLIDE (Nichol et al. 2022).

    Args:
        output_cond, output_uncond: [N, C or 2C, H, W] network outputs at (x_t, t) with the labels
            and with -1.
        x_t: [N, C, H, W]; t: int64 [N], 0-based.
        guidance_scale: s >= 0 (not re-checked here).
        process: the ``DiffusionProcess`` the network was trained for (``GaussianDiffusion.process``).

    Returns:
        The guided output [N, C or 2C, H, W], with ``output_cond``'s dtype.
    """
    channels = x_t.shape[1]
    first_c, first_u = output_cond[:, :channels], output_uncond[:, :channels]
    if process.config.prediction == "eps":
        guided = first_u + guidance_scale * (first_c - first_u)
    else:
        _, eps_c = process.xstart_and_eps_from_output(first_c, x_t, t)
        _, eps_u = process.xstart_and_eps_from_output(first_u, x_t, t)
        guided = process.output_from_eps(x_t, t, eps_u + guidance_scale * (eps_c - eps_u))
    if output_cond.shape[1] > channels:
        guided = torch.cat([guided, output_cond[:, channels:]], dim=1)
    return guided


def classifier_free_guidance(
    model: ConditionalModel, class_labels: torch.Tensor | Sequence[int], guidance_scale: float,
    process: DiffusionProcess, guidance_interval: GuidanceInterval | None = None,
) -> Model:
    """The classifier-free guided network ``(x_t, t) -> output`` of a class-conditional ``model``
    (Ho & Salimans 2022), for any sampler of the core (``generate``, ``GaussianDiffusion``'s loops).

    s = ``guidance_scale``: s = 1 returns ``model(x_t, t, class_labels)`` (one call); s = 0 returns
    ``model(x_t, t, -1)`` (one call); otherwise ONE network call on the doubled batch
    ``[x_t; x_t]``, ``[t; t]``, ``[class_labels; -1]`` ([2N, C, H, W]) whose halves are combined by
    :func:`guide_outputs` (eps_u + s (eps_c - eps_u); learned variance from the conditional half).
    Rows labelled -1 get the unconditional output whatever s is. Cost per image per call:
    :func:`guidance_evaluations` (1 or 2).

    With ``guidance_interval`` (Kynkaanniemi et al. 2024; see the module docstring) only the rows
    whose timestep is in :func:`guided_timesteps` are guided; the others get the conditional output
    ``model(x_t, t, class_labels)``, and a call none of whose rows is guided is one conditional call
    (1 evaluation per image instead of 2). A sampler's cost is then 2 evaluations per image for
    each model call at a guided timestep and 1 for each other call.

    Args:
        model: a class-conditional network ``model(x_t, t, class_labels)`` (``model.config.num_classes``
            is used, when present, to range-check the labels now).
        class_labels: int64 [N] in [-1, K), -1 = no label; N must equal the batch size of every call.
        guidance_scale: s, finite and >= 0.
        process: the ``DiffusionProcess`` of the model (``GaussianDiffusion.process``): its
            prediction type, variance, noise levels and conversions.
        guidance_interval: ``(sigma_lo, sigma_hi)``, 0 <= sigma_lo < sigma_hi (``inf`` allowed), or
            ``None`` to guide every step. Ignored for s in {0, 1}.

    Returns:
        callable ``(x_t [N, C, H, W], t int64 [N]) -> [N, C or 2C, H, W]``.

    Raises:
        ValueError: naming ``guidance_scale`` if it is not finite and >= 0; naming
            ``guidance_interval`` if it is not a valid interval; naming ``class_labels`` on labels
            out of range (now) or a batch size other than N (at call time).
    """
    check_guidance_scale(guidance_scale)
    labels = as_class_labels(class_labels, model_num_classes(model))
    scale = float(guidance_scale)
    inside = None if guidance_interval is None else torch.from_numpy(guided_timesteps(process, guidance_interval))

    if scale == 1.0:
        return with_class_labels(model, labels)
    if scale == 0.0:
        return with_class_labels(model, torch.full_like(labels, NO_LABEL))
    labels_for = _labels_on_device(labels)
    doubled_for = _labels_on_device(torch.cat([labels, torch.full_like(labels, NO_LABEL)]))
    inside_on: dict[torch.device, torch.Tensor] = {}

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = labels_for(x_t)
        rows_inside = None
        if inside is not None:
            if t.device not in inside_on:
                inside_on[t.device] = inside.to(t.device)
            rows_inside = inside_on[t.device][t]
            if not bool(rows_inside.any()):
                return model(x_t, t, y)
        doubled = torch.cat([x_t, x_t])
        output = model(doubled, torch.cat([t, t]), doubled_for(doubled))
        output_cond, output_uncond = output.chunk(2)
        result = guide_outputs(output_cond, output_uncond, x_t, t, scale, process)
        if rows_inside is not None:
            result = torch.where(_per_row(rows_inside, x_t), result, output_cond)
        return torch.where(_per_row(y == NO_LABEL, x_t), output_uncond, result)

    return guided


def _per_row(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool [N] mask shaped [N, 1, 1, ...] to broadcast over ``like`` [N, ...]."""
    return mask.reshape(-1, *([1] * (like.ndim - 1)))
