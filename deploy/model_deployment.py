"""The Serve model deployment: one ``ModelRunner`` per replica, requests merged by ``@serve.batch``.

``DDPMModel`` is configured only through its ``user_config`` (``deploy.config.ModelDeploymentConfig``:
``model_uri``, ``max_batch_size``, ``batch_wait_timeout_s``). ``reconfigure`` loads the model
when ``model_uri`` changes and swaps it in without restarting the replica; requests already
running finish on the model they started with.

Its public methods (``sample``, ``likelihood``) are called by the ingress with requests that are
already validated against the limits; here they are checked against the model (image shape, T),
then queued for a batch. They return either a result or a ``RequestError`` value, so a bad
request never raises inside the replica, and a failure inside a batch reaches only its own request.
"""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any

import numpy as np
import ray
import torch
from ray import serve

from deploy.config import ModelDeploymentConfig
from deploy.errors import RequestError
from deploy.model_runner import LikelihoodJob, ModelRunner, SampleJob, load_runner
from deploy.request_models import LikelihoodOptions, SampleRequest
from pipelines.registry.guidance_fields import interval_as_json


def replica_cpus() -> int:
    """Whole CPUs assigned to this Ray worker (rounded up, at least 1); 1 outside Ray."""
    if not ray.is_initialized():
        return 1
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, math.ceil(cpus))


def as_request_error(error: Exception) -> RequestError:
    """Map an exception from a batch to the client error of its request.

    ``RequestError`` is kept; ``ValueError``/``TypeError`` (the core's bad-input errors) become
    422 on the request body. Anything else is re-raised (the ingress answers 500).
    """
    if isinstance(error, RequestError):
        return error
    if isinstance(error, (ValueError, TypeError)):
        return RequestError(422, "body", str(error))
    raise error


@serve.deployment(name="DDPMModel", max_ongoing_requests=32)
class DDPMModel:
    """A replica serving one model: batched sampling (any ``diffusion_core.generate`` sampler) and bits/dim."""

    def __init__(self) -> None:
        torch.set_num_threads(replica_cpus())
        self._runner: ModelRunner | None = None
        self._config: ModelDeploymentConfig | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a ``ModelDeploymentConfig`` dict: load ``model_uri`` if it or ``network`` changed (in a thread,
        so requests keep being served by the current model meanwhile), then update batching.

        Raises:
            pydantic.ValidationError: on an invalid config.
            ValueError / FileNotFoundError: if the model cannot be fetched or loaded (the old
                model, if any, stays in place).
        """
        config = ModelDeploymentConfig.model_validate(user_config)
        if self._runner is None or self._config is None or (config.model_uri, config.network) != (
                self._config.model_uri, self._config.network):
            self._runner = await asyncio.to_thread(load_runner, config.model_uri, None, config.network)
        self._config = config
        for handler in (self._sample_batch, self._likelihood_batch):
            handler.set_max_batch_size(config.max_batch_size)
            handler.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    def _require_runner(self) -> ModelRunner:
        if self._runner is None:
            raise RuntimeError("no model loaded: set user_config.model_uri of deployment DDPMModel")
        return self._runner

    def check_health(self) -> None:
        """Serve's health check: fails while no model is loaded."""
        self._require_runner()

    def info(self) -> dict[str, Any]:
        """``ModelRunner.describe()`` plus this replica's identity and batching settings."""
        runner = self._require_runner()
        context = serve.get_replica_context()
        return {
            **runner.describe(),
            "replica": {
                "replica_id": context.replica_id.unique_id,
                "actor_id": ray.get_runtime_context().get_actor_id(),
                "pid": os.getpid(),
                "torch_threads": torch.get_num_threads(),
            },
            "batching": self._config.model_dump(exclude={"model_uri", "network"}) if self._config else None,
        }

    async def sample(self, request: SampleRequest, seed: int, max_num_steps: int) -> dict[str, Any] | RequestError:
        """Samples for one validated request: ``{"images": float32 [N, C, H, W], "num_steps": int,
        "settings": SamplerSettings.params() dict, "network_evaluations": int (per image, guidance's
        doubled batch counted), "guidance_interval": [sigma_lo, sigma_hi] of the job (``None``
        when every step or none is guided; ``None`` for an unbounded upper end), "class_labels": the request's labels as class indices, one per image
        (``None`` for an image without), or ``None`` when it gives none, "model": ModelSource dict}``,
        or the ``RequestError`` explaining why not."""
        runner = self._require_runner()
        try:
            job = runner.make_sample_job(request, seed, max_num_steps)
            labels = runner.resolve_class_labels(request.class_label, request.num_images)
        except RequestError as err:
            return err
        result = await self._sample_batch(job)
        if isinstance(result, Exception):
            return as_request_error(result)
        return {"images": result.numpy(), "num_steps": job.num_steps, "settings": job.sampler_settings.params(),
                "network_evaluations": job.network_evaluations(runner.loaded.diffusion),
                "guidance_interval": interval_as_json(job.guidance_interval),
                "class_labels": None if labels is None else [None if label < 0 else label for label in labels],
                "model": runner.source.to_dict()}

    async def likelihood(
        self, options: LikelihoodOptions, pixels: np.ndarray, seed: int, images_field: str, max_num_steps: int
    ) -> dict[str, Any] | RequestError:
        """Bits/dim of uint8 ``pixels`` [N, H, W, C]: ``{"results": [per-image dict], "class_labels":
        per image the class index its bound is conditioned on (``None``: none) or ``None`` when no
        image has one, "model": ...}`` (see ``ModelRunner.likelihood_group``), or the ``RequestError``
        explaining why not."""
        runner = self._require_runner()
        try:
            job = runner.make_likelihood_job(options, pixels, seed, images_field, max_num_steps)
        except RequestError as err:
            return err
        result = await self._likelihood_batch(job)
        if isinstance(result, Exception):
            return as_request_error(result)
        labels = job.class_labels
        return {"results": result, "model": runner.source.to_dict(),
                "class_labels": None if labels is None else [None if label < 0 else label for label in labels]}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _sample_batch(self, jobs: list[SampleJob]) -> list[torch.Tensor | Exception]:
        runner = self._require_runner()
        return await asyncio.to_thread(runner.sample_many, jobs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _likelihood_batch(self, jobs: list[LikelihoodJob]) -> list[list[dict[str, Any]] | Exception]:
        runner = self._require_runner()
        return await asyncio.to_thread(runner.likelihood_many, jobs)
