"""Request models of the DDPM Serve app: strict pydantic bodies of ``/sample`` and ``/likelihood`` (no Ray, no torch).

``SampleRequest`` and ``LikelihoodOptions`` / ``LikelihoodJsonRequest`` reject unknown fields,
wrong types, NaN/inf, non-positive counts and unknown choices with the field's name (a 422 through
``deploy.errors.request_error_from_validation``). ``class_label``, ``guidance_scale`` and
``guidance_interval`` (class-conditional models, classifier-free guidance) are checked here for their form; whether a label fits the model
(its classes, or that it has any) is checked on the replica (``deploy.model_runner``). The cost of a request is checked against the
limits in ``deploy.limits``; uploaded images are decoded by ``deploy.decoding``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from deploy.errors import field_error
from diffusion_core.guidance import GuidanceInterval
from diffusion_core.samplers.registry import DEFAULT_SAMPLER, ETA, PARAMETERS, SAMPLERS, Parameter, SamplerName, takers
from pipelines.registry.class_labels import check_class_label_value
from pipelines.registry.guidance_fields import interval_from_request

MAX_SEED = 2**63 - 1
"""Largest accepted ``seed`` (seeds are 0 <= seed <= 2**63 - 1, the range of torch.Generator)."""

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
"""pydantic config of every request, limit and ``user_config`` model: unknown fields, type coercion
and NaN/inf are refused, and a validated model is immutable."""

SampleFormat = Literal["png", "grid", "npy"]
LikelihoodMethod = Literal["estimate", "exact"]

SAMPLER_PARAMETERS: dict[str, tuple[str, ...]] = {
    name: tuple(p for p in spec.parameters if p != "num_steps") for name, spec in SAMPLERS.items()
}
"""The request fields each sampler takes besides ``num_steps``: the sampler registry's
(``diffusion_core.samplers.registry``, torch-free)."""

OPTIONAL_PARAMETERS = tuple(name for name in PARAMETERS if name not in ("num_steps", "eta"))
"""The request fields that are ``None`` unless given (each taken by some samplers only)."""

DEFAULT_NUM_STEPS: dict[str, int] = {
    name: spec.default_num_steps for name, spec in SAMPLERS.items() if spec.default_num_steps is not None
}
"""``num_steps`` of a request that omits it (capped at the model's T), the registry's per sampler
(20 for "dpm_solver", 18 for "edm_heun", else 50). "ddpm" always runs all T steps."""

MAX_ETA = 1.0
"""Largest ``eta`` a request may give (the HTTP API's bound; the core's is ``inf``)."""

DEFAULT_GUIDANCE_SCALE = 1.0
"""``guidance_scale`` of a request that omits it: s = 1 is the conditional model itself, unguided
(diffusers' convention: s = 0 the unconditional model, s > 1 guides; Ho & Salimans' w = s - 1)."""

GuidanceIntervalField = tuple[float, float | None] | None
"""A request's ``guidance_interval``: ``[sigma_lo, sigma_hi]`` with 0 <= sigma_lo < sigma_hi, or
``[sigma_lo, null]`` for no upper end (JSON has no inf), or absent (guide every step)."""


ClassLabelField = int | str | list[int | str | None] | None
"""A request's ``class_label``: a class index >= 0 or a class name (one label for every image), or a
list of those with one entry per image (``null``: that image has no label), or absent (no label)."""


class _ClassLabelMixin(BaseModel):
    """The ``class_label`` field and its check of form (``pipelines.registry.class_labels``): a
    bool, float, negative index, empty name or empty list is a 422 naming ``class_label``."""

    model_config = STRICT

    class_label: ClassLabelField = None

    @field_validator("class_label", mode="before")
    @classmethod
    def _class_label_form(cls, value: object) -> object:
        try:
            return check_class_label_value(value)
        except ValueError as err:  # pydantic would prefix "Value error, "
            raise PydanticCustomError("class_label", "{message}", {"message": str(err)}) from None


class _SampleRequestBase(_ClassLabelMixin):
    """The fields of ``POST /sample`` before the sampler parameters, and the checks across fields."""

    num_images: int = Field(1, gt=0)
    sampler: SamplerName = DEFAULT_SAMPLER
    num_steps: int | None = Field(None, gt=0)
    eta: float = Field(ETA.default, ge=ETA.low, le=MAX_ETA)
    guidance_scale: float = Field(DEFAULT_GUIDANCE_SCALE, ge=0.0)
    guidance_interval: GuidanceIntervalField = None

    @field_validator("guidance_interval", mode="before")
    @classmethod
    def _guidance_interval_form(cls, value: object) -> object:
        try:
            interval_from_request(value)
        except ValueError as err:  # pydantic would prefix "Value error, "
            raise PydanticCustomError("guidance_interval", "{message}", {"message": str(err)}) from None
        return value if value is None else tuple(value)  # a JSON array; the strict field takes a tuple

    def guidance_interval_or_none(self) -> GuidanceInterval | None:
        """``guidance_interval`` as the core takes it: ``(sigma_lo, sigma_hi)`` with a ``null`` upper
        end as inf, or ``None``."""
        return interval_from_request(self.guidance_interval)

    @model_validator(mode="after")
    def _parameters_fit_the_sampler(self) -> "_SampleRequestBase":
        if isinstance(self.class_label, list) and len(self.class_label) != self.num_images:
            raise field_error("class_label", f"{len(self.class_label)} labels for num_images={self.num_images}; "
                                             "give one label per image, or a single label for all")
        spec = SAMPLERS[self.sampler]
        given = [name for name in OPTIONAL_PARAMETERS if getattr(self, name) is not None]
        for name in (["eta"] if self.eta != ETA.default else []) + given:
            if name not in spec.parameters:
                raise field_error(name, f"{name} applies to sampler {' / '.join(map(repr, takers(name)))} only; "
                                        f"omit it for {self.sampler!r}")
        corrector_steps = getattr(self, "corrector_steps", None)
        if corrector_steps is not None and corrector_steps < spec.min_corrector_steps:
            raise field_error("corrector_steps", f"sampler {self.sampler!r} needs corrector_steps >= "
                                                 f"{spec.min_corrector_steps} (its only steps are corrector steps); "
                                                 "use sampler 'pc' for none")
        return self

    def sampler_parameters(self) -> dict[str, Any]:
        """The sampler parameters this request sets (``eta`` for "ddim", and each of ``spacing``,
        ``corrector_steps``, ``snr``, ``order``, ``algorithm`` that is given), as keyword arguments of
        ``SamplerSettings``; what is left out takes the core's defaults."""
        given = {name: getattr(self, name) for name in OPTIONAL_PARAMETERS}
        eta = {"eta": float(self.eta)} if "eta" in SAMPLERS[self.sampler].parameters else {}
        return {**eta, **{name: value for name, value in given.items() if value is not None}}


def _optional_field(parameter: Parameter) -> tuple[Any, Any]:
    """The request field of a sampler parameter: ``None`` unless given, else of the parameter's
    type (its choices as a ``Literal``) within its range (an infinite end is no bound)."""
    kind = Literal[parameter.choices] if parameter.choices else parameter.kind
    bounds = {}
    if parameter.low is not None:
        bounds["gt" if parameter.low_open else "ge"] = parameter.kind(parameter.low)
    if parameter.high is not None and parameter.high != float("inf"):
        bounds["lt" if parameter.high_open else "le"] = parameter.kind(parameter.high)
    return Optional[kind], Field(None, **bounds)


SampleRequest = create_model(
    "SampleRequest",
    __base__=_SampleRequestBase,
    __module__=__name__,
    **{name: _optional_field(PARAMETERS[name]) for name in OPTIONAL_PARAMETERS},
    seed=(int | None, Field(None, ge=0, le=MAX_SEED)),
    clip_denoised=(bool, True),
    format=(SampleFormat, "png"),
)
SampleRequest.__doc__ = """JSON body of ``POST /sample``; the sampler fields are the sampler registry's
(``diffusion_core.samplers.registry``: names, ranges and which sampler takes which).

Attributes:
    num_images: N >= 1 images to draw (at most ``Limits.max_num_images``).
    sampler: "ddpm" (ancestral sampling over all T steps, Ho et al. 2020 Alg. 2), "ddim"
        (Song et al. 2021 eq. 12), "pc" (predictor-corrector: ancestral predictor and
        Langevin corrector, Song et al. 2021, SDEs), "langevin" (annealed Langevin dynamics,
        Song & Ermon 2019), "dpm_solver" (DPM-Solver++ 1/2M, Lu et al. 2022) or "edm_heun" (EDM's
        deterministic Heun sampler, Karras et al. 2022 Alg. 1; 2 S - 1 network evaluations).
    num_steps: S, the sampler's steps (noise levels), 1 <= S <= T; omitted: ``DEFAULT_NUM_STEPS``
        (at most T). For "ddpm" it must be omitted or equal T.
    eta: DDIM stochasticity in [0, 1] (0: deterministic DDIM; 1: DDPM-like variance); "ddim"
        only (any other sampler refuses a non-zero eta).
    spacing: which timesteps the S steps visit, "uniform", "quadratic" or "logsnr"; not for
        "ddpm"; omitted: the sampler's default ("logsnr" for "dpm_solver", else "uniform").
    corrector_steps: M, Langevin corrector steps per level, >= 0 for "pc" and >= 1 for
        "langevin" (only those); omitted: the core's default.
    snr: the Langevin step's signal-to-noise ratio, > 0 ("pc", "langevin" only); omitted: the core's default.
    order: DPM-Solver++ order, 1 or 2 ("dpm_solver" only); omitted: the core's default.
    algorithm: "dpmsolver++" (the ODE) or "sde-dpmsolver++" (the reverse SDE, stochastic)
        ("dpm_solver" only); omitted: the core's default.
    seed: 0 <= seed <= 2**63-1; the same seed gives the same images. Omitted: a random
        seed is drawn and returned.
    clip_denoised: clip the predicted x_0 to [-1, 1] at every step.
    class_label: for a class-conditional model, the class to draw: an index in [0, K) or one of
        the model's class names (``GET /model`` lists them; a name matches exactly, or else
        case-insensitively), for every image; or a list of ``num_images`` of them, ``null`` for
        an image without a label. Omitted: no label (the unconditional model). An unconditional
        model refuses it (422).
    guidance_scale: s of classifier-free guidance (Ho & Salimans 2022), finite and >= 0: s = 1
        (default) the conditional model, s = 0 the unconditional one, s > 1 guides harder
        (``eps_u + s (eps_c - eps_u)``). A scale other than 0 and 1 costs 2 network evaluations per
        image per step. It acts on labelled images only; an unconditional model refuses a scale
        other than 1 (422).
    guidance_interval: ``[sigma_lo, sigma_hi]``: guide only the steps whose noise level sigma_t =
        sqrt(1 / abar_t - 1) lies in (sigma_lo, sigma_hi] (Kynkaanniemi et al. 2024, "Applying
        Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion
        Models"); the other steps use the conditional model and cost 1 network evaluation per image
        instead of 2. 0 <= sigma_lo < sigma_hi; ``null`` as sigma_hi: no upper end. Omitted: every
        step is guided. It has no effect at s = 0 or 1; an unconditional model refuses it (422).
    format: "png" (JSON with one base64 PNG per image), "grid" (one PNG, ``image/png``) or
        "npy" (``application/octet-stream``: ``np.save`` of uint8 ``[N, H, W, C]``).

A parameter given for a sampler that does not take it is a 422 naming that parameter.
"""


class LikelihoodOptions(_ClassLabelMixin):
    """Options of ``POST /likelihood`` (JSON fields, or form fields beside multipart ``files``).

    Attributes:
        class_label: for a class-conditional model, the bound on -log p(x | y) for the class y (an
            index in [0, K) or a class name) of every image, or a list with one label per image
            (``null``: that image's bound is on -log p(x)); omitted: -log p(x) for every image. In a
            multipart form it is one text field: a class name, or a decimal index.
        method: "estimate" (default; unbiased stratified estimate of the bound from K timesteps
            per image, with its standard error) or "exact" (all T terms, ``calc_bpd_loop``).
        num_samples: K >= 2 timesteps of the estimate (at most ``Limits.max_num_samples``;
            ignored by "exact").
        seed: 0 <= seed <= 2**63-1 for the noise (and timesteps) of the bound; omitted: random.
        breakdown: also return the per-term values (bits/dim).
    """

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

