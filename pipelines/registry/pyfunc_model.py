"""The MLflow pyfunc of a trained DDPM: ``mlflow.pyfunc.load_model(uri).predict(...)`` draws samples.

The pyfunc is logged with MLflow's models-from-code (``pyfunc_entry.py``), so no Python object is
pickled; its one artifact is the core checkpoint folder. Its ``predict`` is typed, so MLflow infers
the signature and validates every request against ``PyfuncSampleRequest`` before ``predict`` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel
from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.generate import SamplerSettings, generate, seeded_generator
from pipelines.registry.model_store import find_checkpoint_dir

MAX_IMAGES = 256


class PyfuncSampleRequest(BaseModel):
    """One sampling request to the pyfunc.

    Attributes:
        num_images: N in [1, ``MAX_IMAGES``].
        seed: seed of the CPU ``torch.Generator`` (the same seed gives the same images).
        num_steps: the sampler's steps, in [1, T] (all T for "ddpm").
        sampler: "ddpm", "ddim" (default), "pc", "langevin" or "dpm_solver".
        eta, spacing, corrector_steps, snr, order, algorithm: the sampler's parameters
            (``diffusion_core.generate.SamplerSettings``; ``spacing`` "" takes the sampler's default).
    """

    model_config = ConfigDict(extra="forbid")

    num_images: int = Field(4, ge=1, le=MAX_IMAGES)
    seed: int = Field(0, ge=0)
    num_steps: int = Field(50, ge=1)
    sampler: str = "ddim"
    eta: float = 0.0
    spacing: str = ""
    corrector_steps: int = 1
    snr: float = 0.16
    order: int = 2
    algorithm: str = "dpmsolver++"

    def settings(self) -> SamplerSettings:
        """The ``SamplerSettings`` of this request.

        Raises:
            ValueError: naming the field of an invalid sampler setting.
        """
        return SamplerSettings(sampler=self.sampler, num_steps=self.num_steps, eta=self.eta,
                               spacing=self.spacing or None, corrector_steps=self.corrector_steps, snr=self.snr,
                               order=self.order, algorithm=self.algorithm)


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
