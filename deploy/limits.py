"""Per-request cost limits of the DDPM Serve app and the checks against them (no Ray, no torch).

``Limits`` (ingress ``user_config.limits``) bounds the cost of one request: images, network
evaluations, upload bytes, pixels. A request over a limit gets HTTP 413 (``RequestError``), a
malformed one 422; every check here runs before the request reaches the batching queue, or, for
what depends on the model (T, correctors), on the replica before the job is queued.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from deploy.errors import RequestError
from deploy.request_models import DEFAULT_NUM_STEPS, STRICT, LikelihoodOptions, SampleRequest
from diffusion_core.samplers.registry import SAMPLERS, SamplerName


class Limits(BaseModel):
    """Per-request cost limits, set in the Serve YAML (ingress ``user_config.limits``).

    Attributes:
        max_num_images: most images one ``/sample`` request may ask for.
        max_num_steps: most network evaluations (model calls) per image of one request: T for
            "ddpm" and for the exact bound (``method: "exact"``), ``num_steps`` S for "ddim" and
            "dpm_solver", S (1 + corrector_steps) for "pc", S corrector_steps + 1 for "langevin",
            2 S - 1 for "edm_heun" (the sampler registry's cost, ``diffusion_core.samplers.registry``).
        max_num_samples: most timesteps K of the stratified likelihood estimate per image.
        max_likelihood_images: most images in one ``/likelihood`` request.
        max_upload_bytes: largest request body in bytes (JSON or multipart).
        max_image_pixels: largest H*W of an uploaded image, checked from its header before decoding.
    """

    model_config = STRICT

    max_num_images: int = Field(16, gt=0)
    max_num_steps: int = Field(1000, gt=0)
    max_num_samples: int = Field(64, gt=0)
    max_likelihood_images: int = Field(32, gt=0)
    max_upload_bytes: int = Field(4_000_000, gt=0)
    max_image_pixels: int = Field(1_048_576, gt=0)



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


def resolve_num_steps(sampler: SamplerName, num_steps: int | None, num_timesteps: int, max_num_steps: int) -> int:
    """The steps S of a sampling request for a model with T steps.

    "ddpm" always runs all T steps (``num_steps`` must be omitted or equal T); the other samplers
    run ``num_steps`` (default ``min(DEFAULT_NUM_STEPS[sampler], T)``), which must be <= T. Every
    sampler needs at least S network evaluations per image, so S over ``max_num_steps`` is refused
    (the corrector steps of "pc"/"langevin" are counted by ``check_network_evaluations``).

    Raises:
        RequestError: 422 if ``num_steps`` does not fit the model, 413 if S exceeds ``max_num_steps``.
    """
    if "num_steps" not in SAMPLERS[sampler].parameters:  # "ddpm"
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
        at_least = "at least " if "corrector_steps" in SAMPLERS[sampler].parameters else ""
        raise RequestError(
            413, "num_steps",
            f"{sampler} needs {at_least}{steps} network evaluations per image, over the limit of {max_num_steps}",
        )
    return steps


def check_network_evaluations(sampler: SamplerName, evaluations: int, fewest: int, max_num_steps: int) -> None:
    """Raise ``RequestError`` 413 if a request's ``evaluations`` (network evaluations per image,
    ``SamplerSettings.network_evaluations``) are over ``max_num_steps``.

    The error names ``corrector_steps`` when the corrector steps are what goes over the limit
    (``fewest``, the count with the sampler's fewest corrector steps, fits), else ``num_steps``.
    """
    if evaluations <= max_num_steps:
        return
    takes_correctors = "corrector_steps" in SAMPLERS[sampler].parameters
    field = "corrector_steps" if takes_correctors and fewest <= max_num_steps else "num_steps"
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



def pixel_budget(limits: Limits) -> int:
    """Most uint8 values a JSON ``pixels`` array may hold: ``max_likelihood_images * max_image_pixels * 3``."""
    return int(limits.max_likelihood_images) * int(limits.max_image_pixels) * 3

