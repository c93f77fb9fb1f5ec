"""The MLflow pyfunc of a trained DDPM: ``mlflow.pyfunc.load_model(uri).predict(...)`` draws samples.

The pyfunc is logged with MLflow's models-from-code (``pyfunc_entry.py``), so no Python object is
pickled; its one artifact is the core checkpoint folder. Its ``predict`` is typed (``model_input:
list[PyfuncSampleRequest]``, MLflow 3's type-hint signatures), so MLflow infers the signature and
validates every request against ``PyfuncSampleRequest`` before ``predict`` runs. The request's
sampler fields are generated from the sampler registry (``diffusion_core.samplers.registry``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel
from pydantic import BaseModel, ConfigDict, Field, create_model

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.generate import SamplerSettings, generate, seeded_generator
from diffusion_core.samplers.registry import DEFAULT_SAMPLER, NUM_STEPS, PARAMETERS
from pipelines.registry.model_store import find_checkpoint_dir

MAX_IMAGES = 256


class _SampleRequestBase(BaseModel):
    """What every pyfunc request is: strict about unknown fields, and turned into ``SamplerSettings``."""

    model_config = ConfigDict(extra="forbid")

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
"""


class DDPMCheckpointModel(PythonModel):
    """Samples of a core checkpoint as an MLflow pyfunc.

    ``predict`` takes a list of requests (dicts with the fields of ``PyfuncSampleRequest``) and
    returns, per request, its images as nested lists ``[N][C][H][W]`` of floats in [-1, 1]
    (``numpy.asarray`` turns one into a float array ``[N, C, H, W]``).
    """

    def load_context(self, context: Any) -> None:
        """Load the checkpoint artifact onto the CPU (``self.loaded``, a ``LoadedModel``)."""
        self.loaded = load_checkpoint(find_checkpoint_dir(Path(context.artifacts["checkpoint"])))

    def predict(self, context: Any, model_input: list[PyfuncSampleRequest],
                params: dict[str, Any] | None = None) -> list[list[list[list[list[float]]]]]:
        """Samples for each request (see the class docstring).

        Raises:
            ValueError: naming the field of an invalid sampler setting, or (from the core) if
                ``num_steps`` exceeds the model's T.
        """
        results = []
        for request in model_input:
            shape = (request.num_images, *self.loaded.unet_config.image_shape)
            images = generate(self.loaded.diffusion, self.loaded.model, shape, request.settings(),
                              generator=seeded_generator(request.seed))
            results.append(images.tolist())
        return results
