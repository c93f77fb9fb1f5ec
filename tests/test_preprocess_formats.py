"""Input formats and channel modes of image-folder sources, through the real entry point
(``preprocess.main(argv)``): BMP, TIFF (raw and LZW), WebP (lossless) and PNG files round-trip
exactly; RGB keeps the R, G, B channel order; gray, palette and RGBA inputs are converted the way
Pillow converts them; RGB inputs become one luma channel with ``--mode L``; 16-bit files are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _preprocess_helpers import run_cli, to_unit
from PIL import Image

from pipelines.data.shards.reader import load_manifest, read_split_numpy

H, W = 5, 7
#: One constant pixel per channel, all different, so a swapped channel order cannot pass.
RGB_CONSTANT = (200, 100, 30)


def _noise(seed: int, channels: int = 3) -> np.ndarray:
    shape = (H, W, channels) if channels > 1 else (H, W)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], str]:
    """(folder, {file: source uint8 [H, W, 3] for the lossless RGB files}, name of the 16-bit file)."""
    root = tmp_path_factory.mktemp("formats") / "src"
    root.mkdir()
    rgb = {
        "a.bmp": ("BMP", {}),
        "b.tif": ("TIFF", {}),
        "c.tiff": ("TIFF", {"compression": "tiff_lzw"}),
        "d.webp": ("WEBP", {"lossless": True}),
        "e.png": ("PNG", {}),
        "f.BMP": ("BMP", {}),  # upper-case extension
    }
    sources = {}
    for i, (name, (fmt, options)) in enumerate(rgb.items()):
        pixels = _noise(i)
        Image.fromarray(pixels, mode="RGB").save(root / name, format=fmt, **options)
        sources[name] = pixels
    constant = np.empty((H, W, 3), np.uint8)
    constant[...] = RGB_CONSTANT
    Image.fromarray(constant, mode="RGB").save(root / "g_channels.png")
    sources["g_channels.png"] = constant
    Image.fromarray(_noise(20, channels=1), mode="L").save(root / "h_gray.png")
    palette = Image.fromarray(_noise(21), mode="RGB").quantize(colors=16)
    assert palette.mode == "P"
    palette.save(root / "i_palette.png")
    rgba = np.dstack([_noise(22), _noise(23, channels=1)])
    Image.fromarray(rgba, mode="RGBA").save(root / "j_rgba.png")
    sixteen = "k_sixteen.tif"
    image16 = Image.fromarray((np.arange(H * W, dtype=np.uint16).reshape(H, W) * 1000))
    assert image16.mode == "I;16"
    image16.save(root / sixteen, format="TIFF")
    return root, sources, sixteen


def _converted(ray_local, capsys, root: Path, output: Path, *mode: str):
    code, _, err = run_cli(capsys, "--input", root, "--output", output, "--size", H, W, "--val-fraction", 0, *mode)
    assert code == 0, err
    images, _ = read_split_numpy(str(output), "train")
    return load_manifest(str(output)), images


def test_bmp_tiff_webp_png_round_trip_exactly_in_rgb_order(ray_local, folder, tmp_path: Path, capsys):
    root, sources, sixteen = folder
    manifest, images = _converted(ray_local, capsys, root, tmp_path / "rgb")  # folders default to RGB
    assert manifest.options["mode"] == "RGB" and manifest.image_shape == (3, H, W)
    assert [r["file"] for r in manifest.rejected] == [sixteen]
    assert "unsupported pixel mode 'I;16'" in manifest.rejected[0]["reason"]
    good = sorted(p.name for p in root.iterdir() if p.name != sixteen)  # listing order
    assert manifest.counts == {"train": len(good), "val": 0, "test": 0} and images.shape == (len(good), 3, H, W)
    rows = dict(zip(good, images))
    for name, pixels in sources.items():  # lossless RGB files: exact, channel 0 = R, 1 = G, 2 = B
        np.testing.assert_array_equal(rows[name], to_unit(pixels.transpose(2, 0, 1)), err_msg=name)
    for channel, value in enumerate(RGB_CONSTANT):
        np.testing.assert_array_equal(rows["g_channels.png"][channel], np.float32(value) / np.float32(127.5) - np.float32(1))
    gray = np.asarray(Image.open(root / "h_gray.png"))
    for channel in range(3):  # a gray input is replicated into R, G and B
        np.testing.assert_array_equal(rows["h_gray.png"][channel], to_unit(gray))
    for name in ("i_palette.png", "j_rgba.png"):  # Pillow's own conversion (palette lookup, alpha dropped)
        expected = np.asarray(Image.open(root / name).convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(rows[name], to_unit(expected), err_msg=name)
    rgba = np.asarray(Image.open(root / "j_rgba.png"))
    np.testing.assert_array_equal(rows["j_rgba.png"], to_unit(rgba[..., :3].transpose(2, 0, 1)))


def test_mode_l_turns_every_input_into_one_luma_channel(ray_local, folder, tmp_path: Path, capsys):
    root, sources, sixteen = folder
    manifest, images = _converted(ray_local, capsys, root, tmp_path / "gray", "--mode", "L")
    assert manifest.options["mode"] == "L" and manifest.image_shape == (1, H, W)
    assert [r["file"] for r in manifest.rejected] == [sixteen]
    good = sorted(p.name for p in root.iterdir() if p.name != sixteen)
    assert images.shape == (len(good), 1, H, W)
    rows = dict(zip(good, images[:, 0]))
    for name in good:  # exactly Pillow's convert("L") of the decoded file
        expected = np.asarray(Image.open(root / name).convert("L"))
        np.testing.assert_array_equal(rows[name], to_unit(expected), err_msg=name)
    for name, pixels in sources.items():  # ... which is ITU-R 601-2 luma of the source (to rounding)
        luma = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        k = np.round((rows[name].astype(np.float64) + 1) * 127.5)
        assert np.abs(k - luma).max() <= 1.0, name
    np.testing.assert_array_equal(rows["h_gray.png"], to_unit(np.asarray(Image.open(root / "h_gray.png"))))
