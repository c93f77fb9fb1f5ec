"""A request's ``guidance_interval`` as users give it over JSON, for the HTTP app and the MLflow pyfunc.

JSON has no infinity, so a request writes the interval of noise levels to guide (Kynkaanniemi et al.
2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion
Models"; ``diffusion_core.guidance``) as ``[sigma_lo, sigma_hi]`` or ``[sigma_lo, null]`` (no upper
end), and an answer reports it the same way. Plain Python, no torch.
"""

from __future__ import annotations

import math
from typing import Any

from diffusion_core.guidance import GuidanceInterval, check_guidance_interval


def interval_from_request(value: Any) -> GuidanceInterval | None:
    """The core's ``(sigma_lo, sigma_hi)`` of a request's ``guidance_interval`` (``None`` as upper end:
    inf), or ``None`` when the request gives none.

    Args:
        value: ``None``, or a list / tuple of two numbers, the second possibly ``None``.

    Raises:
        ValueError: unless 0 <= sigma_lo < sigma_hi (two finite numbers, or a finite sigma_lo and
            ``None``; booleans are not numbers here). The message gives the expected form; the caller
            names the field and shows the value (pydantic's location and input).
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_finite_number, (value[0], value[1] or 0))):
        interval = (float(value[0]), math.inf if value[1] is None else float(value[1]))
        try:
            check_guidance_interval(interval)
            return interval
        except ValueError:
            pass
    raise ValueError("must be [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi, or [sigma_lo, null] for "
                     "no upper end")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def interval_as_json(guidance_interval: GuidanceInterval | None) -> list[float | None] | None:
    """A core guidance interval in a request's form: ``[lo, hi]``, ``[lo, None]`` for hi = inf, or ``None``."""
    if guidance_interval is None:
        return None
    low, high = (float(v) for v in guidance_interval)
    return [low, high if math.isfinite(high) else None]
