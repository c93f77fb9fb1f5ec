"""The MLflow pyfunc of a trained DDPM: ``mlflow.pyfunc.load_model(uri).predict(...)`` draws samples.

The pyfunc is logged with MLflow's models-from-code (``pyfunc_entry.py``), so no Python object is
pickled; its one artifact is the core checkpoint folder. Its ``predict`` is typed (``model_input:
list[PyfuncSampleRequest]``, MLflow 3's type-hint signatures), so MLflow infers the signature and
validates every request against ``PyfuncSampleRequest`` before ``predict`` runs. The request's
sampler fields are generated from the sampler registry (``diffusion_core.samplers.registry``); a
class-conditional model also takes ``class_label``, ``guidance_scale`` and ``guidance_interval``, as
the HTTP ``/sample`` does (``pipelines.registry.class_labels`` resolves the labels and
``pipelines.registry.guidance_fields`` the interval for both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mlflow.pyfunc import PythonModel
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.generate import SamplerSettings, generate, seeded_generator
from diffusion_core.samplers.registry import DEFAULT_SAMPLER, NUM_STEPS, PARAMETERS
from pipelines.registry.class_labels import check_class_label_value, model_class_names, resolve_class_labels
from pipelines.registry.guidance_fields import interval_from_request
from pipelines.registry.model_store import find_checkpoint_dir, read_manifest_summary

MAX_IMAGES = 256


class _SampleRequestBase(BaseModel):
    """What every pyfunc request is: strict about unknown fields, and turned into ``SamplerSettings``.

    ``class_label`` is typed ``Optional[Any]`` (MLflow's signature has no union type) and checked
    here (``check_class_label_value``): an index >= 0, a class name, or a list of those with ``None``
    for an image without a label. ``guidance_interval`` is ``Optional[Any]`` for the same reason and
    checked by ``interval_from_request``: ``[sigma_lo, sigma_hi]`` or ``[sigma_lo, None]``.
    """

    model_config = ConfigDict(extra="forbid")

    class_label: Optional[Any] = None
    guidance_scale: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    guidance_interval: Optional[Any] = None

    @field_validator("class_label", mode="before")
    @classmethod
    def _class_label_form(cls, value: Any) -> Any:
        return check_class_label_value(value)

    @field_validator("guidance_interval", mode="before")
    @classmethod
    def _guidance_interval_form(cls, value: Any) -> Any:
        return interval_from_request(value)

    def settings(self) -> SamplerSettings:
        """The ``SamplerSettings`` of this request (``spacing`` "" is the sampler's default).

        Raises:
            ValueError: naming the field of an invalid sampler setting.
        """
        parameters = {name: getattr(self, name) for name in PARAMETERS}
        return SamplerSettings(sampler=self.sampler, **{**parameters, "spacing": self.spacing or None})


def _sampler_fields() -> dict[str, tuple[type, object]]:
    """One field per parameter of the sampler registry, with its kind and default; ``num_steps`` is
    at least 1 and ``spacing`` is "" (the sampler's own) unless given. The other ranges are
    ``SamplerSettings``' to check (a ``ValueError`` naming the field)."""
    fields: dict[str, tuple[type, object]] = {name: (p.kind, p.default) for name, p in PARAMETERS.items()}
    fields["num_steps"] = (int, Field(NUM_STEPS.default, ge=NUM_STEPS.low))
    fields["spacing"] = (str, "")
    return fields


PyfuncSampleRequest = create_model(
    "PyfuncSampleRequest",
    __base__=_SampleRequestBase,
    __module__=__name__,
    num_images=(int, Field(4, ge=1, le=MAX_IMAGES)),
    seed=(int, Field(0, ge=0)),
    sampler=(str, DEFAULT_SAMPLER),
    **_sampler_fields(),
)
PyfuncSampleRequest.__doc__ = """One sampling request to the pyfunc, with the fields of the sampler registry
(``diffusion_core.samplers.registry``).

Attributes:
    num_images: N in [1, ``MAX_IMAGES``].
    seed: seed of the CPU ``torch.Generator`` (the same seed gives the same images).
    sampler: a name of the registry ("ddim" by default).
    num_steps, eta, spacing, corrector_steps, snr, order, algorithm: the sampler's parameters with
        the registry's defaults (``SamplerSettings``; ``spacing`` "" takes the sampler's default).
    class_label: for a class-conditional model, an index in [0, K) or a class name for every
        image, or a list of ``num_images`` of them (``None``: no label); omitted: no label.
    guidance_scale: s of classifier-free guidance (Ho & Salimans 2022), finite and >= 0; 1
        (default) is the conditional model, 0 the unconditional one, s > 1 guides (2 network
        evaluations per image per step).
    guidance_interval: ``[sigma_lo, sigma_hi]`` (or ``[sigma_lo, None]``: no upper end): guide only
        the steps whose noise level sigma_t = sqrt(1 / abar_t - 1) lies in (sigma_lo, sigma_hi]
        (Kynkaanniemi et al. 2024), the others use the conditional model (1 network evaluation per
        image); omitted: every step.
"""


class DDPMCheckpointModel(PythonModel):
    """Samples of a core checkpoint as an MLflow pyfunc.

    ``predict`` takes a list of requests (dicts with the fields of ``PyfuncSampleRequest``) and
    returns, per request, its images as nested lists ``[N][C][H][W]`` of floats in [-1, 1]
    (``numpy.asarray`` turns one into a float array ``[N, C, H, W]``).

    Attributes:
        loaded: the checkpoint (``LoadedModel``), on the CPU.
        manifest: the summary of the training data's manifest logged beside it (``None``: none); with
            the checkpoint metadata, where a class-conditional model's class names come from.
    """

    manifest: dict[str, Any] | None = None

    def load_context(self, context: Any) -> None:
        """Load the checkpoint artifact onto the CPU (``self.loaded``, a ``LoadedModel``) and the data
        manifest summary beside it (``self.manifest``)."""
        folder = find_checkpoint_dir(Path(context.artifacts["checkpoint"]))
        self.loaded = load_checkpoint(folder)
        self.manifest = read_manifest_summary(folder)

    def predict(self, context: Any, model_input: list[PyfuncSampleRequest],
                params: dict[str, Any] | None = None) -> list[list[list[list[list[float]]]]]:
        """Samples for each request (see the class docstring).

        Raises:
            ValueError: naming the field of an invalid sampler setting, or (from the core) if
                ``num_steps`` exceeds the model's T; naming ``class_label`` if the labels do not fit
                the model (an unconditional one, an index out of range, an unknown name, a list of
                another length than ``num_images``); naming ``guidance_scale`` if a scale other than
                1 is given to an unconditional model; naming ``guidance_interval`` if an unconditional
                model is given one.
        """
        results = []
        for request in model_input:
            shape = (request.num_images, *self.loaded.unet_config.image_shape)
            images = generate(self.loaded.diffusion, self.loaded.model, shape, request.settings(),
                              generator=seeded_generator(request.seed), class_labels=self._labels(request),
                              guidance_scale=request.guidance_scale, guidance_interval=request.guidance_interval)
            results.append(images.tolist())
        return results

    def _labels(self, request: Any) -> list[int] | None:
        """The request's class labels for the model, one per image (-1: none), or ``None``."""
        num_classes = self.loaded.unet_config.num_classes
        if num_classes is None and request.guidance_scale != 1.0:
            raise ValueError(f"guidance_scale: {request.guidance_scale} asks for classifier-free guidance, but this "
                             "model is unconditional (trained without class labels)")
        if num_classes is None and request.guidance_interval is not None:
            raise ValueError("guidance_interval: this model is unconditional (trained without class labels) and "
                             "takes no guidance; omit guidance_interval")
        try:
            names = model_class_names(num_classes, self.loaded.metadata, self.manifest)
            return resolve_class_labels(request.class_label, request.num_images, num_classes, names)
        except ValueError as err:
            raise ValueError(f"class_label: {err}") from err
