"""Pixel conventions and PNG encoding (diffusion_core.images)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core.images import encode_png, float_to_uint8, images_to_pngs, make_grid, uint8_to_float


def test_uint8_float_round_trip_is_exact_on_the_grid():
    k = np.arange(256, dtype=np.uint8)
    x = uint8_to_float(k)
    assert x.dtype == np.float32 and x[0] == -1.0 and x[-1] == 1.0
    np.testing.assert_allclose(x, k / 127.5 - 1.0, atol=1e-7)
    np.testing.assert_array_equal(float_to_uint8(x), k)


def test_float_to_uint8_clips_and_accepts_tensors_of_any_float_dtype():
    values = [-3.0, -1.0, -0.999, 0.0, 0.999, 1.0, 2.5]
    expected = np.clip(np.rint((np.array(values) + 1) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(float_to_uint8(np.array(values)), expected)
    np.testing.assert_array_equal(float_to_uint8(torch.tensor(values, dtype=torch.float64)), expected)
    grid = torch.tensor(uint8_to_float(np.arange(256, dtype=np.uint8)))
    np.testing.assert_array_equal(float_to_uint8(grid.requires_grad_()), np.arange(256))


def test_uint8_to_float_rejects_other_dtypes():
    with pytest.raises(TypeError, match="uint8"):
        uint8_to_float(np.zeros(3, dtype=np.int64))


def test_make_grid_places_each_image_in_its_tile():
    images = np.stack([np.full((3, 4, 5), uint8_to_float(np.uint8(10 * (i + 1)))) for i in range(5)])
    grid = make_grid(images, nrow=3, padding=2)
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (5 + 2) + 2, 3) and grid.dtype == np.uint8
    for i in range(5):
        r, q = divmod(i, 3)
        top, left = 2 + r * 6, 2 + q * 7
        assert (grid[top : top + 4, left : left + 5] == 10 * (i + 1)).all()
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()  # the border
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        make_grid(np.zeros((3, 4, 5)))


def test_pngs_decode_back_to_the_same_pixels():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 1, 6, 7), dtype=np.uint8)
    decoded = [np.asarray(Image.open(io.BytesIO(png))) for png in images_to_pngs(uint8_to_float(pixels))]
    np.testing.assert_array_equal(np.stack(decoded)[:, None], pixels)
    rgb = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(rgb)))), rgb)


def test_importing_images_does_not_import_torch():
    """Ray Data's preprocessing workers import this module; importing torch adds ~190 MB of RSS to each (measured here)."""
    code = "import sys, diffusion_core.images, pipelines.data.transforms; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False", done.stdout + done.stderr
