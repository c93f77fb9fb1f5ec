"""Per-image work of the preprocessing job: decode, check, convert, resize + center-crop, split.

Everything here is plain Pillow/numpy (no Ray), so the same functions serve the Ray Data job,
the single-process baseline of the benchmark and the tests.

Pixel convention (docs/ARCHITECTURE.md, "Conventions"): uint8 ``k`` becomes exactly ``k / 127.5 - 1`` via
``diffusion_core.images.uint8_to_float``; nothing here rescales values any other way.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffusion_core.images import uint8_to_float

#: Container formats accepted from image folders (Pillow format names).
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
#: File name extensions listed as images in a folder source (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: 8-bit Pillow modes that convert losslessly to "L"/"RGB"; others (16-bit, float) are rejected.
ACCEPTED_PIXEL_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
RESAMPLE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_MAX_PIXELS = 50_000_000


class BadImageError(ValueError):
    """One input item could not be turned into an image; ``file`` names it, ``reason`` says why."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"bad input file {file!r}: {reason}")
        self.file = file
        self.reason = reason

    def __reduce__(self):  # keep (file, reason) through pickling across Ray processes
        return (type(self), (self.file, self.reason))


@dataclass(frozen=True)
class ImageSpec:
    """What every output image looks like.

    Attributes:
        height, width: output size in pixels (each in [1, 4096]).
        mode: "L" (1 channel) or "RGB" (3 channels).
        resample: Pillow filter for resizing: one of ``RESAMPLE_FILTERS``.
        max_pixels: inputs with more than this many pixels (width * height, read from the header
            before decoding) are rejected as possible decompression bombs; in [1, 2**31].
    """

    height: int
    width: int
    mode: Literal["L", "RGB"] = "L"
    resample: str = "bicubic"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
                raise ValueError(f"{name} must be an integer in [1, 4096], got {value!r}")
        if self.mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB', got {self.mode!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS)}, got {self.resample!r}")
        if not isinstance(self.max_pixels, int) or not 1 <= self.max_pixels <= 2**31:
            raise ValueError(f"max_pixels must be an integer in [1, 2**31], got {self.max_pixels!r}")

    @property
    def channels(self) -> int:
        """1 for "L", 3 for "RGB"."""
        return 1 if self.mode == "L" else 3

    @property
    def shape(self) -> tuple[int, int, int]:
        """The output image shape (C, H, W)."""
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class SplitSpec:
    """Deterministic carving of "val" out of "train" from a hash of each item's identity.

    Each item arrives with the split its source gives it ("train", "val" or "test"). A "train"
    item goes to "val" when ``blake2b(f"{seed}:{identity}")`` (first 8 bytes, big-endian, divided
    by 2**64) is below ``val_fraction``; "val" and "test" items keep their split, so val is never
    carved from test. Reruns with the same seed give the same split, independent of ordering,
    parallelism or which other items are present. A source with its own "val" is read with
    ``val_fraction=0`` (nothing carved).

    Attributes:
        val_fraction: expected share of items in "val", in [0, 1).
        seed: any integer.
    """

    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")

    def is_val(self, identity: str) -> bool:
        """True when the item named ``identity`` belongs to the "val" split."""
        digest = hashlib.blake2b(f"{self.seed}:{identity}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64 < self.val_fraction

    def val_mask(self, identities) -> np.ndarray:
        """``is_val`` for each identity: bool array [N]."""
        return np.fromiter((self.is_val(str(i)) for i in identities), dtype=bool, count=len(identities))

    def assign(self, identities, origins) -> np.ndarray:
        """The output split of each item: its source split ``origins[i]``, except that a "train"
        item whose hash falls below ``val_fraction`` becomes "val". Object array of str [N]."""
        splits = np.asarray(origins, dtype=object).copy()
        if self.val_fraction > 0:
            carve = splits == "train"
            if carve.any():
                candidates = np.flatnonzero(carve)
                hit = self.val_mask([identities[i] for i in candidates])
                splits[candidates[hit]] = "val"
        return splits


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image file bytes with Pillow, fully (so truncation is caught here).

    Args:
        data: the file's bytes (PNG, JPEG, BMP, TIFF or WebP).
        max_pixels: reject images whose header declares more than this many pixels.

    Returns:
        the loaded image (first frame for multi-frame files).

    Raises:
        ValueError: with a human-readable reason: empty file, unrecognised format, too many
            pixels (or Pillow's own ``DecompressionBombError``), unsupported pixel mode, or
            corrupt/truncated data.
    """
    if len(data) == 0:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError as error:
            raise ValueError(f"decompression bomb rejected by Pillow: {error}") from None
        except UnidentifiedImageError:
            raise ValueError(
                f"not a recognised image: Pillow cannot identify it as any of {', '.join(ACCEPTED_FORMATS)}"
            ) from None
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(
                f"too many pixels: {width}x{height} = {width * height} > max_pixels {max_pixels} "
                "(possible decompression bomb)"
            )
        if width == 0 or height == 0:
            raise ValueError(f"image has no pixels ({width}x{height})")
        if image.mode not in ACCEPTED_PIXEL_MODES:
            raise ValueError(f"unsupported pixel mode {image.mode!r}: only 8-bit images are accepted")
        try:
            image.load()
        except Image.DecompressionBombError as error:
            raise ValueError(f"decompression bomb rejected by Pillow: {error}") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:
            raise ValueError(f"corrupt or truncated image data ({type(error).__name__}: {error})") from None
    return image


def fit_image(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Convert to ``spec.mode``, resize so the shorter side fits and center-crop to H x W.

    Uses ``PIL.ImageOps.fit`` (crop to the target aspect ratio around the center, then one resize
    with ``spec.resample``); an image already of size W x H is left untouched, so pixel values
    pass through exactly.

    Returns:
        uint8 array [C, H, W].
    """
    if image.mode != spec.mode:
        image = image.convert(spec.mode)
    if image.size != (spec.width, spec.height):
        image = ImageOps.fit(image, (spec.width, spec.height), method=RESAMPLE_FILTERS[spec.resample])
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def image_file_to_pixels(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode one image file and fit it to ``spec``: uint8 [C, H, W].

    Raises:
        ValueError: with the rejection reason (see ``decode_image``).
    """
    return fit_image(decode_image(data, spec.max_pixels), spec)


def gray_array_to_pixels(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Fit a batch of 8-bit grayscale images (IDX data) to ``spec``.

    Args:
        pixels: uint8 [N, h, w].

    Returns:
        uint8 [N, C, H, W]; when (h, w) == (H, W) and mode is "L" the values are unchanged.
    """
    n, h, w = pixels.shape
    if (h, w) == (spec.height, spec.width) and spec.mode == "L":
        return pixels[:, None, :, :].copy()
    out = np.empty((n, *spec.shape), dtype=np.uint8)
    for i in range(n):
        out[i] = fit_image(Image.fromarray(pixels[i], mode="L"), spec)
    return out


def rgb_array_to_pixels(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Fit a batch of 8-bit RGB images (CIFAR-10 records, channels first) to ``spec``.

    Args:
        pixels: uint8 [N, 3, h, w].

    Returns:
        uint8 [N, C, H, W]; when (h, w) == (H, W) and mode is "RGB" the values are unchanged.
    """
    n, _, h, w = pixels.shape
    if (h, w) == (spec.height, spec.width) and spec.mode == "RGB":
        return pixels.copy()
    out = np.empty((n, *spec.shape), dtype=np.uint8)
    for i in range(n):
        out[i] = fit_image(Image.fromarray(np.ascontiguousarray(pixels[i].transpose(1, 2, 0)), mode="RGB"), spec)
    return out


def output_batch(
    pixels: np.ndarray,
    labels: np.ndarray,
    files: list[str],
    errors: list[str],
    split: SplitSpec,
    origins: list[str] | str = "train",
) -> dict[str, np.ndarray]:
    """Assemble the columns the preprocessing job hands to the shard writer.

    Args:
        pixels: uint8 [N, C, H, W] (anything, e.g. zeros, in rows that have an error).
        labels: integer [N]; -1 where unknown.
        files: identity of each item (relative path, or ``"<idx file>:<index>"``) [N].
        errors: rejection reason per item, ``""`` for good items [N].
        split: carves "val" out of "train" from each identity (:meth:`SplitSpec.assign`).
        origins: the split the source gives each item ("train", "val" or "test") [N], or one
            split for all of them.

    Returns:
        dict with "image" float32 [N, C, H, W] (exactly k/127.5 - 1, via
        ``diffusion_core.images.uint8_to_float``), "label" int64 [N], "split" str [N] (the
        output split), "error" str [N] and "file" str [N].
    """
    if isinstance(origins, str):
        origins = [origins] * len(files)
    return {
        "image": uint8_to_float(pixels),
        "label": np.asarray(labels, dtype=np.int64),
        "split": split.assign(files, origins),
        "error": np.asarray(errors, dtype=object),
        "file": np.asarray(files, dtype=object),
    }
