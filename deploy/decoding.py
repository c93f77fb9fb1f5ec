"""Image input of ``/likelihood``: uploads and JSON pixel arrays into uint8 ``[N, H, W, C]`` (no Ray, no torch).

``decode_image_upload`` / ``pixels_from_json`` turn PNG/JPEG uploads or JSON pixel arrays into
uint8 arrays, and ``check_images_for_model`` checks them against the model's ``(C, H, W)``; each
failure is a ``RequestError`` naming the field that carried the images. ``deploy.http_io`` calls
them while parsing a request.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from deploy.errors import RequestError

_MODE_CHANNELS = {"L": 1, "RGB": 3}


def decode_image_upload(data: bytes, field: str, max_image_pixels: int) -> np.ndarray:
    """Decode one uploaded PNG/JPEG into uint8 ``[H, W, C]`` (C = 1 for mode "L", 3 for "RGB").

    The image size is read from the header and checked against ``max_image_pixels`` before the
    pixels are decoded.

    Raises:
        RequestError: 422 naming ``field`` if the bytes are empty, not a PNG/JPEG, truncated or
            corrupt, or in a mode other than "L"/"RGB" (e.g. RGBA, palette, 16-bit); 413 if
            H*W is over ``max_image_pixels``.
    """
    if not data:
        raise RequestError(422, field, "empty upload; expected a PNG or JPEG image")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise RequestError(422, field, f"not a PNG/JPEG image ({type(err).__name__})") from err
    with image:
        if image.format not in ("PNG", "JPEG"):
            raise RequestError(422, field, f"image format {image.format!r} is not accepted; send PNG or JPEG")
        width, height = image.size
        if width * height > max_image_pixels:
            raise RequestError(
                413, field, f"{width}x{height} image is over the limit of {max_image_pixels} pixels"
            )
        if image.mode not in _MODE_CHANNELS:
            raise RequestError(
                422, field, f"image mode {image.mode!r} is not accepted; send 8-bit grayscale (L) or RGB"
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise RequestError(422, field, f"truncated or corrupt image data ({err})") from err
        pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(height, width, _MODE_CHANNELS[image.mode])


def pixels_from_json(pixels: list[Any], max_values: int) -> np.ndarray:
    """Convert the ``pixels`` field of a JSON likelihood request into uint8 ``[N, H, W, C]``.

    Accepts nested lists shaped ``[N, H, W, C]`` or ``[N, H, W]`` (read as C = 1) of integers in
    [0, 255].

    Raises:
        RequestError: 422 naming ``pixels`` if the lists are ragged, not 3-D/4-D, hold
            non-numbers, NaN/inf, non-integers or values outside [0, 255]; 413 if they hold more
            than ``max_values`` numbers.
    """
    try:
        array = np.asarray(pixels)
    except ValueError as err:
        raise RequestError(
            422, "pixels", f"ragged nested lists; expected a rectangular [N, H, W, C] array ({err})"
        ) from err
    if array.ndim not in (3, 4):
        raise RequestError(
            422, "pixels",
            f"expected a 4-D [N, H, W, C] or 3-D [N, H, W] array, got {array.ndim}-D shape {list(array.shape)}",
        )
    if array.size > max_values:
        raise RequestError(413, "pixels", f"{array.size} values is over the limit of {max_values}")
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.dtype == np.bool_ or not numeric:
        raise RequestError(422, "pixels", f"values must be integers in [0, 255], got {array.dtype} entries")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise RequestError(422, "pixels", "values must be integers in [0, 255], found NaN or infinity")
        if not (array == np.round(array)).all():
            raise RequestError(422, "pixels", "values must be integers in [0, 255], found a fractional value")
    low, high = array.min(), array.max()
    if low < 0 or high > 255:
        raise RequestError(422, "pixels", f"values must be in [0, 255], found range [{low}, {high}]")
    array = array.astype(np.uint8)
    return array[..., None] if array.ndim == 3 else array


def check_images_for_model(images: np.ndarray, image_shape: tuple[int, int, int], field: str) -> None:
    """Check uint8 images ``[N, H, W, C]`` against the model's ``image_shape`` ``(C, H, W)``.

    Raises:
        RequestError: 422 naming ``field`` on a size or channel-count mismatch.
    """
    channels, height, width = image_shape
    n, h, w, c = images.shape
    if (h, w) != (height, width):
        raise RequestError(422, field, f"images are {h}x{w} (HxW); this model takes {height}x{width}")
    if c != channels:
        raise RequestError(422, field, f"images have {c} channel(s); this model takes {channels}")
    if n == 0:
        raise RequestError(422, field, "no images given")

