"""HTTP request parsing and response encoding of the DDPM app (Starlette/FastAPI objects, no Ray).

* ``read_body``: the request body, refused (413/411) before reading when ``Content-Length`` is
  over the upload limit.
* ``parse_sample_request`` / ``parse_likelihood_request``: JSON or multipart bodies into the
  pydantic models of ``deploy.request_models`` and uint8 images ``[N, H, W, C]`` (a multipart
  ``class_label`` of decimal digits is a class index, any other text a class name).
* ``sample_response``: float images ``[N, C, H, W]`` in [-1, 1] as JSON with base64 PNGs, one
  PNG grid (``image/png``) or an ``.npy`` file (``application/octet-stream``, uint8
  ``[N, H, W, C]``).

Every client error raises ``deploy.errors.RequestError``.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.decoding import decode_image_upload, pixels_from_json
from deploy.errors import RequestError, request_error_from_validation
from deploy.limits import Limits, check_content_length, check_likelihood_limits, check_sample_limits, pixel_budget
from deploy.request_models import LikelihoodJsonRequest, LikelihoodOptions, SampleRequest
from diffusion_core.images import encode_png, float_to_uint8, images_to_pngs, make_grid

_M = TypeVar("_M", bound=BaseModel)
FILES_FIELD = "files"


@dataclass(frozen=True)
class LikelihoodInput:
    """A parsed ``/likelihood`` request: its options, uint8 images [N, H, W, C], and the name of
    the field that carried them ("files" for uploads, "pixels" for JSON)."""

    options: LikelihoodOptions
    pixels: np.ndarray
    images_field: str


async def read_body(request: Request, limits: Limits) -> bytes:
    """The whole request body, after checking ``Content-Length`` against ``limits.max_upload_bytes``.

    Raises:
        RequestError: 411 without a valid ``Content-Length``, 413 over the limit.
    """
    check_content_length(request.headers.get("content-length"), limits.max_upload_bytes)
    return await request.body()


def parse_json_model(model: type[_M], body: bytes) -> _M:
    """Validate a JSON body strictly against ``model``.

    Raises:
        RequestError: 422 naming the first bad field ("body" for invalid JSON or a non-object).
    """
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise request_error_from_validation(err) from err


async def parse_sample_request(request: Request, limits: Limits) -> SampleRequest:
    """The ``SampleRequest`` of a ``POST /sample`` JSON body, within ``limits``.

    Raises:
        RequestError: 411/413 for the body size, 422 for bad fields, 413 over the image/step limits.
    """
    _require_json(request)
    sample = parse_json_model(SampleRequest, await read_body(request, limits))
    check_sample_limits(sample, limits)
    return sample


def _require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    if content_type and not content_type.lower().startswith("application/json"):
        raise RequestError(415, "Content-Type", f"{content_type!r} is not accepted; send application/json")


async def parse_likelihood_request(request: Request, limits: Limits) -> LikelihoodInput:
    """Parse ``POST /likelihood``: a multipart form (images in ``files``, options as form fields)
    or a JSON body (``pixels`` plus options), checked against ``limits``.

    Raises:
        RequestError: 411/413 for the body size, 413 for too many images/pixels or timesteps,
            415 for another content type, 422 for bad options or images (the field is named:
            ``files[i]`` for the i-th upload, ``pixels`` for JSON arrays).
    """
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        check_content_length(request.headers.get("content-length"), limits.max_upload_bytes)
        return await _parse_multipart(request, limits)
    _require_json(request)
    body = parse_json_model(LikelihoodJsonRequest, await read_body(request, limits))
    check_likelihood_limits(body, len(body.pixels), "pixels", limits)
    pixels = pixels_from_json(body.pixels, pixel_budget(limits))
    options = LikelihoodOptions(**body.model_dump(exclude={"pixels"}))
    return LikelihoodInput(options, pixels, "pixels")


async def _parse_multipart(request: Request, limits: Limits) -> LikelihoodInput:
    try:
        form = await request.form(max_files=limits.max_likelihood_images + 1, max_fields=16,
                                  max_part_size=limits.max_upload_bytes)
    except StarletteHTTPException as err:
        raise RequestError(422, "body", f"malformed multipart form: {err.detail}") from err
    try:
        uploads = form.getlist(FILES_FIELD)
        fields = {key: value for key, value in form.multi_items() if key != FILES_FIELD}
        if any(not isinstance(value, str) for value in fields.values()):
            bad = next(key for key, value in fields.items() if not isinstance(value, str))
            raise RequestError(422, bad, f"unexpected file upload; images go in the {FILES_FIELD!r} field")
        label = fields.get("class_label")
        if isinstance(label, str) and label.strip().isdecimal():  # a form field is text: digits are an index
            fields["class_label"] = int(label)
        try:
            options = LikelihoodOptions.model_validate(fields, strict=False)
        except ValidationError as err:
            raise request_error_from_validation(err) from err
        if not uploads:
            raise RequestError(422, FILES_FIELD, "no images uploaded; send PNG/JPEG files in the 'files' field")
        check_likelihood_limits(options, len(uploads), FILES_FIELD, limits)
        images = [await _decode_upload(upload, f"{FILES_FIELD}[{i}]", limits) for i, upload in enumerate(uploads)]
    finally:
        await form.close()
    for i, image in enumerate(images[1:], start=1):
        if image.shape != images[0].shape:
            raise RequestError(
                422, f"{FILES_FIELD}[{i}]",
                f"image is {list(image.shape)} (H, W, C) but {FILES_FIELD}[0] is {list(images[0].shape)}",
            )
    return LikelihoodInput(options, np.stack(images), FILES_FIELD)


async def _decode_upload(upload: Any, field: str, limits: Limits) -> np.ndarray:
    if not isinstance(upload, UploadFile):
        raise RequestError(422, field, "expected an uploaded image file, got a text field")
    return decode_image_upload(await upload.read(), field, limits.max_image_pixels)


def sample_response(images: np.ndarray, fmt: str, metadata: dict[str, Any]) -> Response:
    """Encode float32 images ``[N, C, H, W]`` in [-1, 1] (clipped on encoding) as ``fmt``.

    * "png": JSON ``{"images": [base64 PNG, ...], "shape": [N, H, W, C], **metadata}``;
    * "grid": one PNG of all images tiled (``image/png``);
    * "npy": ``np.save`` of uint8 ``[N, H, W, C]`` (``application/octet-stream``).

    For "grid" and "npy" the seed and model version travel in ``X-Seed`` / ``X-Model-Version`` headers.
    """
    if fmt == "png":
        pngs = [base64.b64encode(png).decode("ascii") for png in images_to_pngs(images)]
        n, c, h, w = images.shape
        return JSONResponse({"images": pngs, "shape": [n, h, w, c], **metadata})
    headers = {"X-Seed": str(metadata.get("seed")), "X-Model-Version": str(metadata.get("model", {}).get("version"))}
    if fmt == "grid":
        return Response(encode_png(make_grid(images)), media_type="image/png", headers=headers)
    buffer = io.BytesIO()
    np.save(buffer, float_to_uint8(images).transpose(0, 2, 3, 1), allow_pickle=False)
    return Response(buffer.getvalue(), media_type="application/octet-stream", headers=headers)
