"""Pixel conventions and image encoding shared by preprocessing, training and serving.

Data pixels are exactly ``k / 127.5 - 1`` for integer ``k`` in [0, 255] (docs/ARCHITECTURE.md), so the
mapping uint8 <-> [-1, 1] here is the only one the project uses. This module does not import
torch (it accepts torch tensors by duck typing), so Ray Data's preprocessing workers stay light.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


def uint8_to_float(pixels: np.ndarray) -> np.ndarray:
    """Map uint8 pixels k in [0, 255] to float32 ``k / 127.5 - 1`` in [-1, 1], any shape.

    Raises:
        TypeError: if ``pixels`` is not a uint8 array.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got dtype {pixels.dtype}")
    return (pixels.astype(np.float32) / np.float32(127.5)) - np.float32(1.0)


def float_to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Map floats in [-1, 1] (any shape) to uint8 by rounding ``(x + 1) * 127.5``; values outside
    [-1, 1] are clipped. The exact inverse of ``uint8_to_float`` on the 256-level grid."""
    if hasattr(x, "detach"):  # a torch.Tensor, on any device and of any float dtype
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile images ``[N, C, H, W]`` in [-1, 1] into one uint8 array ``[H', W', C]`` (C is 1 or 3).

    Args:
        images: float images in [-1, 1], shape ``[N, C, H, W]`` with N >= 1.
        nrow: images per row; defaults to ceil(sqrt(N)).
        padding: pixels of black border between tiles.

    Raises:
        ValueError: if ``images`` is not 4-D with N >= 1.
    """
    pixels = float_to_uint8(images)
    if pixels.ndim != 4 or pixels.shape[0] == 0:
        raise ValueError(f"expected images of shape [N, C, H, W] with N >= 1, got {pixels.shape}")
    n, c, h, w = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.zeros((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i].transpose(1, 2, 0)
    return grid


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode a uint8 image ``[H, W, C]`` (C = 1 or 3) or ``[H, W]`` as PNG bytes with Pillow."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def images_to_pngs(images: torch.Tensor | np.ndarray) -> list[bytes]:
    """Encode each image of ``[N, C, H, W]`` in [-1, 1] as its own PNG (bytes), in order."""
    pixels = float_to_uint8(images)
    return [encode_png(p.transpose(1, 2, 0)) for p in pixels]
