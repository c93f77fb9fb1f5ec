"""The project's one module of input checks: clear ``ValueError``/``TypeError`` messages that name
the bad value and the allowed range (docs/ARCHITECTURE.md, "Conventions").

Scalar checks (``check_choice``, ``check_positive_int``, ``check_int_in_range``, ``check_bool``) serve
the config dataclasses of every layer; tensor checks serve the diffusion math.
"""

from __future__ import annotations

from typing import Any, get_args

import numpy as np
import torch


def check_choice(name: str, value: Any, literal: Any) -> None:
    """Require ``value`` to be one of the choices of the ``Literal`` type ``literal``.

    Raises:
        ValueError: naming ``name``, the value and the allowed choices.
    """
    allowed = get_args(literal)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_positive_int(name: str, value: Any) -> None:
    """Require an integer (not bool) ``>= 1``.

    Raises:
        ValueError: naming ``name`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def check_bool(name: str, value: Any) -> None:
    """Require a real ``bool`` (YAML's ``yes``/``1`` strings and ints are refused).

    Raises:
        ValueError: naming ``name`` and the value.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false")


def check_number_in(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Require a real number (not bool) in the interval from ``low`` to ``high``, each end closed
    unless ``low_open`` / ``high_open``.

    Raises:
        ValueError: naming ``name``, the value and the interval in ``[a, b)`` notation.
    """
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    above = is_number and (value > low if low_open else value >= low)
    if not (above and (value < high if high_open else value <= high)):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} must be a number in {interval}")


def check_optional_str(name: str, value: Any) -> None:
    """Require ``None`` or a string that is not blank.

    Raises:
        ValueError: naming ``name`` and the value.
    """
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{name}={value!r} must be a non-empty string or null")


def check_int_in_range(name: str, value, low: int, high: int | None = None, why: str = "") -> None:
    """Require an integer (not bool) with ``low <= value`` (and ``value <= high`` when given).

    Raises:
        ValueError: naming ``name``, the value and the allowed range (plus ``why``, if given).
    """
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{name}={value!r} must be {allowed}{why}")


def check_images(x: torch.Tensor, name: str = "x") -> None:
    """Require a floating-point tensor [N, C, H, W] with N >= 1.

    Raises:
        TypeError: if ``x`` is not a torch.Tensor.
        ValueError: on a non-4-D shape, an empty batch or a non-floating dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, C, H, W], got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W] (4 dims), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)}); N must be >= 1")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (float32), got dtype {x.dtype}")


def check_timesteps(t: torch.Tensor, batch_size: int, num_timesteps: int) -> None:
    """Require integer timesteps [N] with N = ``batch_size`` and values in [0, T).

    Raises:
        TypeError: if ``t`` is not a torch.Tensor.
        ValueError: on a wrong shape, a non-integer dtype, or a value outside [0, num_timesteps).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be an int64 torch.Tensor [N], got {type(t).__name__}")
    if t.ndim != 1 or t.shape[0] != batch_size:
        raise ValueError(f"t must have shape [N] = [{batch_size}], got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"t must be an integer (int64) tensor, got dtype {t.dtype}")
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= num_timesteps:
        bad = low if low < 0 else high
        raise ValueError(f"timestep {bad} is out of range; t must be in [0, {num_timesteps - 1}] (0-based)")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Require ``a`` to be a tensor with exactly ``b``'s shape.

    Raises:
        TypeError: if ``a`` is not a torch.Tensor.
        ValueError: if the shapes differ.
    """
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name_a} must be a torch.Tensor, got {type(a).__name__}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; they must match"
        )


def check_model_output(output: torch.Tensor, x_t: torch.Tensor, learn_sigma: bool) -> None:
    """Require the model output to be [N, C_out, H, W] with C_out = 2C when ``learn_sigma`` else C.

    Raises:
        TypeError: if ``output`` is not a torch.Tensor.
        ValueError: on any other shape (the message gives the expected one).
    """
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"model output must be a torch.Tensor, got {type(output).__name__}")
    n, c, h, w = x_t.shape
    expected = (n, 2 * c if learn_sigma else c, h, w)
    if tuple(output.shape) != expected:
        why = "2C channels (learned_range variance)" if learn_sigma else "C channels (fixed variance)"
        raise ValueError(
            f"model output has shape {tuple(output.shape)}; expected {expected}: {why} for x_t of shape {(n, c, h, w)}"
        )
