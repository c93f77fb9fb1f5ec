"""Request models, limits and input validation of the DDPM Serve app (no Ray, no torch).

Everything a client sends is checked here, before any request reaches the batching queue:

* ``SampleRequest`` and ``LikelihoodOptions`` / ``LikelihoodJsonRequest`` are strict pydantic
  models (unknown fields, wrong types, NaN/inf, non-positive counts and unknown choices are
  rejected with the field's name).
* ``Limits`` bounds the cost of one request (images, network evaluations, upload bytes, pixels);
  a request over a limit gets HTTP 413, a malformed one HTTP 422.
* ``decode_image_upload`` / ``pixels_from_json`` turn PNG/JPEG uploads or JSON pixel arrays into
  uint8 arrays ``[N, H, W, C]`` and ``check_images_for_model`` checks them against the model's
  ``(C, H, W)``.

Every failure is a ``RequestError(status, field, message)`` whose ``body()`` is the
``{"error": ..., "field": ...}`` JSON the HTTP layer returns.
"""

from __future__ import annotations

import io
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

MAX_SEED = 2**63 - 1
"""Largest accepted ``seed`` (seeds are 0 <= seed <= 2**63 - 1, the range of torch.Generator)."""

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class RequestError(Exception):
    """A client error: HTTP ``status`` (4xx), the offending ``field`` and a human ``message``.

    Picklable (its state lives in ``args``), so a replica can hand it back to the ingress as a
    value. ``str(err)`` is ``"<field>: <message>"``.
    """

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(status, field, message)

    @property
    def status(self) -> int:
        """HTTP status code, 413 for a request over a limit, 422 (or 400) for bad input."""
        return self.args[0]

    @property
    def field(self) -> str:
        """Dotted name of the offending request field (``"body"`` for the request as a whole)."""
        return self.args[1]

    @property
    def message(self) -> str:
        """What is wrong and what is allowed."""
        return self.args[2]

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def body(self) -> dict[str, str]:
        """The JSON body sent to the client: ``{"error": "<field>: <message>", "field": field}``."""
        return {"error": str(self), "field": self.field}


FIELD_ERROR = "request_field"
"""pydantic error type of the checks across fields (``field_error``); its ``ctx["field"]`` is the field to name."""


def field_error(field: str, message: str) -> PydanticCustomError:
    """A validation error, raised in a ``model_validator``, that ``request_error_from_validation``
    reports as a 422 naming ``field`` (instead of the request body as a whole)."""
    return PydanticCustomError(FIELD_ERROR, "{message}", {"field": field, "message": message})


def request_error_from_validation(err: ValidationError | Sequence[dict[str, Any]], prefix: str = "") -> RequestError:
    """Turn pydantic/FastAPI validation errors into one 422 ``RequestError`` naming the first bad field.

    Args:
        err: a pydantic ``ValidationError`` or the list of error dicts of FastAPI's
            ``RequestValidationError.errors()`` (each with ``loc``, ``msg``, ``type``).
        prefix: prepended to the field name (e.g. ``"form."``); a leading ``"body"`` location
            component is dropped.
    """
    errors = err.errors() if isinstance(err, ValidationError) else list(err)
    if not errors:
        return RequestError(422, "body", "invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = prefix + ".".join(loc) if loc else "body"
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == FIELD_ERROR:  # a check across fields that names the field it blames
        field = prefix + str(first["ctx"]["field"])
    elif first.get("type") == "extra_forbidden":
        message = "unknown field (not part of this endpoint's request schema)"
    elif "input" in first and first.get("type") != "json_invalid":
        message = f"{message} (got {_short_repr(first['input'])})"
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return RequestError(422, field, message + more)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Limits(BaseModel):
    """Per-request cost limits, set in the Serve YAML (ingress ``user_config.limits``).

    Attributes:
        max_num_images: most images one ``/sample`` request may ask for.
        max_num_steps: most network evaluations (model calls) per image of one request: T for
            "ddpm" and for the exact bound (``method: "exact"``), ``num_steps`` S for "ddim" and
            "dpm_solver", S (1 + corrector_steps) for "pc", S corrector_steps + 1 for "langevin"
            (``diffusion_core.sampling.network_evaluations``).
        max_num_samples: most timesteps K of the stratified likelihood estimate per image.
        max_likelihood_images: most images in one ``/likelihood`` request.
        max_upload_bytes: largest request body in bytes (JSON or multipart).
        max_image_pixels: largest H*W of an uploaded image, checked from its header before decoding.
    """

    model_config = _STRICT

    max_num_images: int = Field(16, gt=0)
    max_num_steps: int = Field(1000, gt=0)
    max_num_samples: int = Field(64, gt=0)
    max_likelihood_images: int = Field(32, gt=0)
    max_upload_bytes: int = Field(4_000_000, gt=0)
    max_image_pixels: int = Field(1_048_576, gt=0)


NetworkMode = Literal["torchscript", "compiled", "eager"]


class ModelDeploymentConfig(BaseModel):
    """``user_config`` of the model deployment (``DDPMModel``); changing it reconfigures replicas in place.

    Attributes:
        model_uri: ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/<id>/model``,
            ``s3://bucket/prefix`` or a local checkpoint folder (``fetch_checkpoint``).
        max_batch_size: most requests one ``@serve.batch`` call merges (per endpoint).
        batch_wait_timeout_s: how long a batch waits for more requests after its first one; long
            enough for requests that reach the replica one by one through the ingress to fill a
            batch, at the cost of that much more latency for a lone request (README, "Serving").
        network: how the replica runs the UNet: "torchscript" (traced and frozen, the default),
            "compiled" (``torch.compile``, inductor; the first request of each batch size compiles)
            or "eager". A change reloads the model.
    """

    model_config = _STRICT

    model_uri: str = Field(min_length=1)
    max_batch_size: int = Field(8, gt=0)
    batch_wait_timeout_s: float = Field(0.1, ge=0.0)
    network: NetworkMode = "torchscript"


class IngressConfig(BaseModel):
    """``user_config`` of the HTTP ingress deployment (``DDPMIngress``): the request ``limits``, and
    ``api_key_env``, the environment variable of the replica holding the API key that every endpoint
    but ``/healthz`` then requires (``deploy/api_key.py``; unset or empty variable: no key)."""

    model_config = _STRICT

    limits: Limits = Limits()
    api_key_env: str | None = Field(None, min_length=1)


Sampler = Literal["ddpm", "ddim", "pc", "langevin", "dpm_solver"]
Spacing = Literal["uniform", "quadratic", "logsnr"]
DPMAlgorithm = Literal["dpmsolver++", "sde-dpmsolver++"]
SampleFormat = Literal["png", "grid", "npy"]
LikelihoodMethod = Literal["estimate", "exact"]

SAMPLER_PARAMETERS: dict[str, tuple[str, ...]] = {
    "ddpm": (),
    "ddim": ("eta", "spacing"),
    "pc": ("spacing", "corrector_steps", "snr"),
    "langevin": ("spacing", "corrector_steps", "snr"),
    "dpm_solver": ("spacing", "order", "algorithm"),
}
"""The request fields each sampler takes besides ``num_steps`` (the fields of
``diffusion_core.generate.SamplerSettings.uses()``; this module stays free of torch)."""

OPTIONAL_PARAMETERS = ("spacing", "corrector_steps", "snr", "order", "algorithm")
"""The request fields that are ``None`` unless given (each taken by some samplers only)."""

DEFAULT_NUM_STEPS: dict[str, int] = {"ddim": 50, "pc": 50, "langevin": 50, "dpm_solver": 20}
"""``num_steps`` of a request that omits it (capped at the model's T); 20 for "dpm_solver" is
``dpm_solver_sample_loop``'s default. "ddpm" always runs all T steps."""


class SampleRequest(BaseModel):
    """JSON body of ``POST /sample``.

    Attributes:
        num_images: N >= 1 images to draw (at most ``Limits.max_num_images``).
        sampler: "ddpm" (ancestral sampling over all T steps, Ho et al. 2020 Alg. 2), "ddim"
            (Song et al. 2021 eq. 12), "pc" (predictor-corrector: ancestral predictor and
            Langevin corrector, Song et al. 2021, SDEs), "langevin" (annealed Langevin dynamics,
            Song & Ermon 2019) or "dpm_solver" (DPM-Solver++ 1/2M, Lu et al. 2022).
        num_steps: S, the sampler's steps (noise levels), 1 <= S <= T; omitted: ``DEFAULT_NUM_STEPS``
            (at most T). For "ddpm" it must be omitted or equal T.
        eta: DDIM stochasticity in [0, 1] (0: deterministic DDIM; 1: DDPM-like variance); "ddim"
            only (any other sampler refuses a non-zero eta).
        spacing: which timesteps the S steps visit, "uniform", "quadratic" or "logsnr"; not for
            "ddpm"; omitted: "logsnr" for "dpm_solver", else "uniform".
        corrector_steps: M, Langevin corrector steps per level, >= 0 for "pc" and >= 1 for
            "langevin" (only those); omitted: 1.
        snr: the Langevin step's signal-to-noise ratio, > 0 ("pc", "langevin" only); omitted: 0.16.
        order: DPM-Solver++ order, 1 or 2 ("dpm_solver" only); omitted: 2.
        algorithm: "dpmsolver++" (the ODE) or "sde-dpmsolver++" (the reverse SDE, stochastic)
            ("dpm_solver" only); omitted: "dpmsolver++".
        seed: 0 <= seed <= 2**63-1; the same seed gives the same images. Omitted: a random
            seed is drawn and returned.
        clip_denoised: clip the predicted x_0 to [-1, 1] at every step.
        format: "png" (JSON with one base64 PNG per image), "grid" (one PNG, ``image/png``) or
            "npy" (``application/octet-stream``: ``np.save`` of uint8 ``[N, H, W, C]``).

    A parameter given for a sampler that does not take it is a 422 naming that parameter.
    """

    model_config = _STRICT

    num_images: int = Field(1, gt=0)
    sampler: Sampler = "ddim"
    num_steps: int | None = Field(None, gt=0)
    eta: float = Field(0.0, ge=0.0, le=1.0)
    spacing: Spacing | None = None
    corrector_steps: int | None = Field(None, ge=0)
    snr: float | None = Field(None, gt=0.0)
    order: int | None = Field(None, ge=1, le=2)
    algorithm: DPMAlgorithm | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    clip_denoised: bool = True
    format: SampleFormat = "png"

    @model_validator(mode="after")
    def _parameters_fit_the_sampler(self) -> "SampleRequest":
        used = SAMPLER_PARAMETERS[self.sampler]
        if self.eta != 0.0 and "eta" not in used:
            raise field_error("eta", f"eta applies to sampler 'ddim' only; omit it for {self.sampler!r}")
        for name in OPTIONAL_PARAMETERS:
            if getattr(self, name) is not None and name not in used:
                takers = [sampler for sampler, names in SAMPLER_PARAMETERS.items() if name in names]
                raise field_error(name, f"{name} applies to sampler {' / '.join(map(repr, takers))} only; "
                                        f"omit it for {self.sampler!r}")
        if self.sampler == "langevin" and self.corrector_steps == 0:
            raise field_error("corrector_steps", "sampler 'langevin' needs corrector_steps >= 1 (its only steps "
                                                 "are corrector steps); use sampler 'pc' for none")
        return self

    def sampler_parameters(self) -> dict[str, Any]:
        """The sampler parameters this request sets (``eta`` for "ddim", and each of ``spacing``,
        ``corrector_steps``, ``snr``, ``order``, ``algorithm`` that is given), as keyword arguments of
        ``SamplerSettings``; what is left out takes the core's defaults."""
        given = {name: getattr(self, name) for name in OPTIONAL_PARAMETERS}
        eta = {"eta": float(self.eta)} if self.sampler == "ddim" else {}
        return {**eta, **{name: value for name, value in given.items() if value is not None}}


class LikelihoodOptions(BaseModel):
    """Options of ``POST /likelihood`` (JSON fields, or form fields beside multipart ``files``).

    Attributes:
        method: "estimate" (default; unbiased stratified estimate of the bound from K timesteps
            per image, with its standard error) or "exact" (all T terms, ``calc_bpd_loop``).
        num_samples: K >= 2 timesteps of the estimate (at most ``Limits.max_num_samples``;
            ignored by "exact").
        seed: 0 <= seed <= 2**63-1 for the noise (and timesteps) of the bound; omitted: random.
        breakdown: also return the per-term values (bits/dim).
    """

    model_config = _STRICT

    method: LikelihoodMethod = "estimate"
    num_samples: int = Field(16, ge=2)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    breakdown: bool = False


class LikelihoodJsonRequest(LikelihoodOptions):
    """JSON body of ``POST /likelihood``: the options plus ``pixels``.

    ``pixels`` holds uint8 values (integers in [0, 255]) shaped ``[N, H, W, C]``, or ``[N, H, W]``
    for a one-channel model.
    """

    pixels: list[Any] = Field(min_length=1)


def check_sample_limits(request: SampleRequest, limits: Limits) -> None:
    """Raise ``RequestError`` 413 if ``request`` asks for more images, or more steps, than ``limits`` allow.

    Every sampler needs at least ``num_steps`` network evaluations per image, so a ``num_steps``
    over ``max_num_steps`` is refused here, before the request is queued; the exact count depends
    on the model (T, and the sampler's correctors) and is checked by ``resolve_num_steps`` and
    ``check_network_evaluations`` on the replica.
    """
    if request.num_images > limits.max_num_images:
        raise RequestError(
            413, "num_images", f"{request.num_images} is over the limit of {limits.max_num_images} images per request"
        )
    if request.num_steps is not None and request.num_steps > limits.max_num_steps:
        raise RequestError(
            413, "num_steps", f"{request.num_steps} is over the limit of {limits.max_num_steps} steps per request"
        )


def check_likelihood_limits(options: LikelihoodOptions, num_images: int, images_field: str, limits: Limits) -> None:
    """Raise ``RequestError`` 413 if there are too many images (naming ``images_field``) or timesteps K."""
    if num_images > limits.max_likelihood_images:
        raise RequestError(
            413, images_field, f"{num_images} images is over the limit of {limits.max_likelihood_images} per request"
        )
    if options.method == "estimate" and options.num_samples > limits.max_num_samples:
        raise RequestError(
            413, "num_samples", f"{options.num_samples} is over the limit of {limits.max_num_samples} timesteps"
        )


def resolve_num_steps(sampler: Sampler, num_steps: int | None, num_timesteps: int, max_num_steps: int) -> int:
    """The steps S of a sampling request for a model with T steps.

    "ddpm" always runs all T steps (``num_steps`` must be omitted or equal T); the other samplers
    run ``num_steps`` (default ``min(DEFAULT_NUM_STEPS[sampler], T)``), which must be <= T. Every
    sampler needs at least S network evaluations per image, so S over ``max_num_steps`` is refused
    (the corrector steps of "pc"/"langevin" are counted by ``check_network_evaluations``).

    Raises:
        RequestError: 422 if ``num_steps`` does not fit the model, 413 if S exceeds ``max_num_steps``.
    """
    if sampler == "ddpm":
        if num_steps is not None and num_steps != num_timesteps:
            raise RequestError(
                422, "num_steps", f"sampler 'ddpm' runs all T={num_timesteps} steps of this model; got {num_steps} "
                "(omit num_steps, or use sampler 'ddim' or 'dpm_solver' for fewer steps)",
            )
        steps = num_timesteps
    else:
        steps = min(DEFAULT_NUM_STEPS[sampler], num_timesteps) if num_steps is None else num_steps
        if steps > num_timesteps:
            raise RequestError(422, "num_steps", f"{steps} is more than this model's T={num_timesteps} steps")
    if steps > max_num_steps:
        at_least = "at least " if sampler in ("pc", "langevin") else ""
        raise RequestError(
            413, "num_steps",
            f"{sampler} needs {at_least}{steps} network evaluations per image, over the limit of {max_num_steps}",
        )
    return steps


def check_network_evaluations(sampler: Sampler, evaluations: int, fewest: int, max_num_steps: int) -> None:
    """Raise ``RequestError`` 413 if a request's ``evaluations`` (network evaluations per image,
    ``SamplerSettings.network_evaluations``) are over ``max_num_steps``.

    The error names ``corrector_steps`` when the corrector steps are what goes over the limit
    (``fewest``, the count with the sampler's fewest corrector steps, fits), else ``num_steps``.
    """
    if evaluations <= max_num_steps:
        return
    field = "corrector_steps" if sampler in ("pc", "langevin") and fewest <= max_num_steps else "num_steps"
    raise RequestError(
        413, field, f"{sampler} with these settings needs {evaluations} network evaluations per image, over the "
        f"limit of {max_num_steps}",
    )


def check_exact_cost(num_timesteps: int, max_num_steps: int) -> None:
    """Raise ``RequestError`` 413 if the exact bound (T network evaluations per image) is over the limit."""
    if num_timesteps > max_num_steps:
        raise RequestError(
            413, "method", f"'exact' needs T={num_timesteps} network evaluations per image, over the limit of "
            f"{max_num_steps}; use method 'estimate'",
        )


def check_content_length(header: str | None, max_bytes: int) -> None:
    """Check a request's ``Content-Length`` header against ``max_bytes`` before reading the body.

    Raises:
        RequestError: 411 if the header is missing or not a non-negative integer, 413 if it is
            over ``max_bytes``.
    """
    if header is None:
        raise RequestError(411, "Content-Length", "the request body needs a Content-Length header")
    try:
        length = int(header)
    except ValueError:
        length = -1
    if length < 0:
        raise RequestError(411, "Content-Length", f"{header!r} is not a byte count")
    if length > max_bytes:
        raise RequestError(413, "body", f"{length} bytes is over the upload limit of {max_bytes} bytes")


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


def pixel_budget(limits: Limits) -> int:
    """Most uint8 values a JSON ``pixels`` array may hold: ``max_likelihood_images * max_image_pixels * 3``."""
    return int(limits.max_likelihood_images) * int(limits.max_image_pixels) * 3

