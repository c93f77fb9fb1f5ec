"""Batched sampling and likelihood on one loaded checkpoint: the compute behind the Serve app.

No Ray here, so it is tested directly. A ``ModelRunner`` holds a ``LoadedModel`` and

* turns validated requests into jobs, checking what depends on the model (image size and
  channels, T for DDPM / the exact bound, K <= 2T): ``make_sample_job``, ``make_likelihood_job``;
* runs a batch of jobs so that they share network evaluations while every job keeps its own
  ``torch.Generator`` seeded from its ``seed``, so the same seed gives the same result whatever
  else is in the batch: ``sample_many``, ``likelihood_many``. A job's failure is returned as its
  result (an ``Exception``) and never affects the other jobs.

Jobs with equal settings (for sampling, the sampler and every parameter it uses, as
``SamplerSettings.params()``, and the classifier-free guidance scale and interval; method and K for the
likelihood) form one group, computed by one
call of ``diffusion_core.generate.generate`` (the core's unchanged samplers) or of
``calc_bpd_estimate`` / ``calc_bpd_loop`` on all their images at once, with a ``diffusion_core.RowGenerators`` that gives each job's rows its own
generator: every job gets exactly the random draws it would get alone, and the network runs once
per step for the whole group.

Class-conditional models (``UNetConfig.num_classes``): class labels may differ from row to row of
a group (each job's labels, -1 for a job without one), the guidance scale and guidance interval may
not, since they change every labelled row's output. A job's scale is what acts on it: a job without
labels, or at scale 0, runs as the unconditional model at scale 1 (the same output,
``diffusion_core.guidance``), and a job at scale 1 has no interval, so it shares its batch with every
unguided job.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, TypeVar

import numpy as np
import torch

from deploy.config import DEFAULT_NETWORK
from deploy.decoding import check_images_for_model
from deploy.errors import RequestError
from deploy.limits import check_exact_cost, check_network_evaluations, resolve_num_steps
from deploy.request_models import LikelihoodOptions, SampleRequest
from diffusion_core.checkpoint import LoadedModel, load_checkpoint
from diffusion_core.generate import SamplerName, SamplerSettings, generate, guided_network_evaluations
from diffusion_core.guidance import GuidanceInterval, with_class_labels
from diffusion_core.images import uint8_to_float
from diffusion_core.inference_network import InferenceNetwork, NetworkMode, build_inference_network
from diffusion_core.rng import RowGenerators
from diffusion_core.samplers.registry import SAMPLERS
from pipelines.registry.class_labels import NO_LABEL, describe_classes, model_class_names, resolve_class_labels
from pipelines.registry.model_identity import ModelIdentity, describe_model
from pipelines.registry.model_store import fetch_checkpoint, read_manifest_summary

logger = logging.getLogger(__name__)
_J = TypeVar("_J")
_R = TypeVar("_R")


@dataclass(frozen=True)
class SampleJob:
    """One validated sampling request for a given model.

    Attributes:
        num_images: N >= 1.
        sampler: "ddpm", "ddim", "pc", "langevin", "dpm_solver" or "edm_heun".
        num_steps: the sampler's steps S (T for DDPM).
        eta: DDIM stochasticity (unused by the other samplers).
        seed: seed of the job's torch.Generator (initial and per-step noise).
        clip_denoised: clamp the predicted x_0 to [-1, 1] at every step.
        spacing, corrector_steps, snr, order, algorithm: as in ``SamplerSettings`` (same defaults; ``spacing``
            None is the sampler's default).
        class_labels: per image, the class label in [-1, K) of a class-conditional model (-1: no
            label); ``None``: no image has one (every row of a conditional model gets -1).
        guidance_scale: s of classifier-free guidance that acts on the labelled images (1: the
            conditional model; ``ModelRunner.make_sample_job`` stores 1 for a job whose scale acts on
            no image: no labels, or s = 0, whose labels it drops).
        guidance_interval: ``(sigma_lo, sigma_hi)`` (``sigma_hi`` may be inf): guide only the steps
            with sigma_lo < sigma_t <= sigma_hi, sigma_t = sqrt(1 / abar_t - 1) (Kynkaanniemi et al.
            2024; ``diffusion_core.guidance``), the others use the conditional model; ``None``: every
            step (``make_sample_job`` stores ``None`` for a job at scale 1).

    Raises:
        ValueError: naming the field, on values ``SamplerSettings`` refuses.
    """

    num_images: int
    sampler: SamplerName
    num_steps: int
    eta: float
    seed: int
    clip_denoised: bool
    spacing: str | None = None
    corrector_steps: int = SamplerSettings.corrector_steps
    snr: float = SamplerSettings.snr
    order: int = SamplerSettings.order
    algorithm: str = SamplerSettings.algorithm
    class_labels: tuple[int, ...] | None = None
    guidance_scale: float = 1.0
    guidance_interval: GuidanceInterval | None = None

    def __post_init__(self) -> None:
        self.sampler_settings  # noqa: B018 - validates the fields (ValueError naming the bad one)

    @property
    def group(self) -> tuple[Any, ...]:
        """Jobs with an equal group run in one network batch: ``settings``, ``guidance_scale`` and
        ``guidance_interval``."""
        return (self.settings, float(self.guidance_scale), self.guidance_interval)

    def network_evaluations(self, diffusion: Any) -> int:
        """Network evaluations per image with the model's ``GaussianDiffusion``: the sampler's
        (``SamplerSettings.network_evaluations``), with each call at a guided step counted twice (the
        doubled batch; ``diffusion_core.generate.guided_network_evaluations``)."""
        return guided_network_evaluations(diffusion, self.sampler_settings, self.guidance_scale,
                                          self.guidance_interval)

    @property
    def settings(self) -> tuple[tuple[str, Any], ...]:
        """Jobs with equal settings share network evaluations: the items of
        ``sampler_settings.params()`` (the sampler, each parameter it uses, clip_denoised)."""
        return tuple(self.sampler_settings.params().items())

    @property
    def sampler_settings(self) -> SamplerSettings:
        """The core's ``SamplerSettings`` of this job."""
        return SamplerSettings(self.sampler, self.num_steps, self.eta, self.clip_denoised, self.spacing,
                               self.corrector_steps, self.snr, self.order, self.algorithm)


@dataclass(frozen=True)
class LikelihoodJob:
    """One validated likelihood request for a given model.

    Attributes:
        pixels: uint8 [N, H, W, C] images matching the model.
        method: "exact" (all T terms) or "estimate" (stratified, K terms).
        num_samples: K of the estimate (unused by "exact").
        seed: seed of the job's torch.Generator (timesteps and noise of the bound).
        breakdown: also return per-term values.
        class_labels: per image, the class label in [-1, K) of a class-conditional model (the bound
            on -log p(x | y); -1: on -log p(x)); ``None``: no image has one.
    """

    pixels: np.ndarray
    method: Literal["exact", "estimate"]
    num_samples: int
    seed: int
    breakdown: bool
    class_labels: tuple[int, ...] | None = None

    @property
    def settings(self) -> tuple[str, int]:
        """Jobs with equal settings share network evaluations: (method, K; K is unused by "exact")."""
        return (self.method, self.num_samples if self.method == "estimate" else 0)


def isolate_failures(jobs: Sequence[_J], run_group: Callable[[Sequence[_J]], list[_R]]) -> list[_R | Exception]:
    """``run_group(jobs)``, or when that raises, each job on its own (recursively), so that a failure
    is returned only for the job that causes it; results in job order."""
    try:
        return list(run_group(jobs))
    except Exception as err:  # noqa: BLE001 - isolate the failing job below
        if len(jobs) == 1:
            return [err]
    return [isolate_failures([job], run_group)[0] for job in jobs]


def run_grouped(jobs: Sequence[_J], key: Callable[[_J], Any],
                run_group: Callable[[Sequence[_J]], list[_R]]) -> list[_R | Exception]:
    """Run jobs with equal ``key(job)`` together through ``isolate_failures``; results in job order."""
    results: list[Any] = [None] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda i: repr(key(jobs[i])))
    for _, members in itertools.groupby(order, key=lambda i: repr(key(jobs[i]))):
        indices = list(members)
        for index, result in zip(indices, isolate_failures([jobs[i] for i in indices], run_group)):
            results[index] = result
    return results


class ModelRunner:
    """Sampling and bits/dim for one loaded checkpoint.

    Args:
        loaded: the checkpoint (``diffusion_core.checkpoint.load_checkpoint``); its model must be
            in eval mode on ``device``.
        source: where the model came from (name, version, run id).
        manifest: summary of the training data's manifest, or ``None``.
        network: how the UNet runs, a ``diffusion_core.inference_network.NetworkMode`` ("eager",
            "compiled", "padded", "exported"), built (and compiled) here by ``build_inference_network``;
            a mode that fails to build runs the eager module, with a warning logged.

    Raises:
        ValueError: if ``network`` is not a ``NetworkMode`` (e.g. "torchscript"), naming the allowed ones.
    """

    def __init__(self, loaded: LoadedModel, source: ModelIdentity, manifest: dict[str, Any] | None = None,
                 network: NetworkMode = DEFAULT_NETWORK) -> None:
        self.loaded = loaded
        self.source = source
        self.manifest = manifest
        first = next(loaded.model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.num_classes: int | None = loaded.unet_config.num_classes
        """K of a class-conditional model, ``None`` for an unconditional one."""
        self.class_names: tuple[str, ...] | None = model_class_names(self.num_classes, loaded.metadata, manifest)
        """The classes' names, name i = label i (``pipelines.registry.class_labels.model_class_names``),
        ``None`` when the model carries none (its labels are then given as indices)."""
        built = build_inference_network(loaded.model, network, self.image_shape, self.device,
                                        num_classes=self.num_classes)
        if built.reason is not None:
            logger.warning("serving the eager model: building network %r failed (%s)", network, built.reason)
        self.network_mode: str = built.mode
        """The ``NetworkMode`` that runs: ``network``, or "eager" when building it failed."""
        self.network: InferenceNetwork = built
        """What the samplers and bounds call: ``(x_t [N, C, H, W], t int64 [N]) -> [N, C_out, H, W]``, and
        for a class-conditional model also ``(x_t, t, class_labels int64 [N])`` (without labels: -1)."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's images."""
        return self.loaded.unet_config.image_shape

    @property
    def num_timesteps(self) -> int:
        """T of the model's diffusion."""
        return self.loaded.diffusion.num_timesteps

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: name, version, alias, run_id, uri, config (unet, diffusion),
        checkpoint metadata, data manifest summary, image_shape [C, H, W], device, parameter count,
        ``num_classes`` (K, or ``None``) and ``classes`` (``[{"index": i, "name": name or None}]`` for a
        class-conditional model, ``None`` for an unconditional one)."""
        return {
            **self.source.to_dict(),
            "config": {"unet": self.loaded.unet_config.to_dict(), "diffusion": self.loaded.diffusion_config.to_dict()},
            "metadata": self.loaded.metadata,
            "data_manifest": self.manifest,
            "image_shape": list(self.image_shape),
            "device": str(self.device),
            "network": self.network_mode,
            "num_parameters": sum(p.numel() for p in self.loaded.model.parameters()),
            "num_classes": self.num_classes,
            "classes": describe_classes(self.num_classes, self.class_names),
        }

    def resolve_class_labels(self, value: Any, count: int) -> list[int] | None:
        """A request's ``class_label`` as this model's labels, one per image (-1: none), or ``None``
        when it gives none (``pipelines.registry.class_labels.resolve_class_labels``).

        Raises:
            RequestError: 422 naming ``class_label`` if the model is unconditional, a list does not
                hold ``count`` labels, an index is not in [0, K) or a name is not one of the model's
                classes (or the model has no class names).
        """
        try:
            return resolve_class_labels(value, count, self.num_classes, self.class_names)
        except ValueError as err:
            raise RequestError(422, "class_label", str(err)) from err

    # ------------------------------------------------------------------ validation
    def make_sample_job(self, request: SampleRequest, seed: int, max_num_steps: int) -> SampleJob:
        """A ``SampleJob`` for ``request`` with ``seed`` (already resolved when the request had none).

        The job's ``class_labels``, ``guidance_scale`` and ``guidance_interval`` are the ones that act
        (see ``SampleJob``): a request without labels, or at scale 0, becomes a job without labels at
        scale 1, and a job at scale 1 has no interval (a ``null`` upper end becomes inf).

        Raises:
            RequestError: 422 if ``num_steps`` does not fit the model (or a value the core
                refuses), naming ``class_label`` if the labels do not fit the model
                (``resolve_class_labels``), naming ``guidance_scale`` if an unconditional model is
                asked for a scale other than 1 and ``guidance_interval`` if it is given one; 413 if the network evaluations per image
                (``SampleJob.network_evaluations``: the sampler's, twice over when guided) exceed
                ``max_num_steps``, naming ``num_steps``, or ``corrector_steps`` when the correctors
                are what goes over.
        """
        labels = self.resolve_class_labels(request.class_label, request.num_images)
        scale = float(request.guidance_scale)
        if self.num_classes is None and scale != 1.0:
            raise RequestError(422, "guidance_scale", f"{scale} asks for classifier-free guidance, but this model is "
                                                      "unconditional (trained without class labels); omit guidance_scale")
        interval = request.guidance_interval_or_none()
        if self.num_classes is None and interval is not None:
            raise RequestError(422, "guidance_interval", "this model is unconditional (trained without class labels) "
                                                         "and takes no guidance; omit guidance_interval")
        if labels is None or scale == 0.0 or all(label == NO_LABEL for label in labels):
            labels, scale = None, 1.0  # the unconditional model, whatever the scale (diffusion_core.guidance)
        if scale == 1.0:
            interval = None  # nothing is guided: the job joins the unguided batches
        steps = resolve_num_steps(request.sampler, request.num_steps, self.num_timesteps, max_num_steps)
        parameters = request.sampler_parameters()
        try:
            job = SampleJob(request.num_images, request.sampler, steps, parameters.pop("eta", 0.0), int(seed),
                            request.clip_denoised, **parameters,
                            class_labels=None if labels is None else tuple(labels), guidance_scale=scale,
                            guidance_interval=interval)
            settings = job.sampler_settings
            evaluations = job.network_evaluations(self.loaded.diffusion)
            fewest = evaluations
            if "corrector_steps" in settings.uses():
                least = SAMPLERS[settings.sampler].min_corrector_steps
                fewest = dataclasses.replace(job, corrector_steps=least).network_evaluations(self.loaded.diffusion)
        except ValueError as err:  # the pydantic schema already checks each field; this is the core's word
            raise RequestError(422, "body", str(err)) from err
        check_network_evaluations(request.sampler, evaluations, fewest, max_num_steps)
        return job

    def make_likelihood_job(
        self, options: LikelihoodOptions, pixels: np.ndarray, seed: int, images_field: str, max_num_steps: int
    ) -> LikelihoodJob:
        """A ``LikelihoodJob`` for uint8 ``pixels`` [N, H, W, C] and the request ``options``.

        Raises:
            RequestError: 422 naming ``images_field`` if the images do not match the model's
                (C, H, W), 422 if ``num_samples`` is outside [2, 2T], 422 naming ``class_label`` if
                the labels do not fit the model (``resolve_class_labels``), 413 if the exact bound's T
                network evaluations exceed ``max_num_steps``.
        """
        check_images_for_model(pixels, self.image_shape, images_field)
        labels = self.resolve_class_labels(options.class_label, pixels.shape[0])
        if options.method == "exact":
            check_exact_cost(self.num_timesteps, max_num_steps)
        elif not 2 <= options.num_samples <= 2 * self.num_timesteps:
            raise RequestError(
                422, "num_samples", f"{options.num_samples} must be in [2, {2 * self.num_timesteps}] "
                f"(two draws per stratum of this model's T={self.num_timesteps} steps)",
            )
        return LikelihoodJob(pixels, options.method, options.num_samples, int(seed), options.breakdown,
                             None if labels is None else tuple(labels))

    # ------------------------------------------------------------------ sampling
    def sample_many(self, jobs: Sequence[SampleJob]) -> list[torch.Tensor | Exception]:
        """Samples for every job, float32 [num_images, C, H, W] in [-1, 1] when clipped, on CPU.

        Jobs with equal ``group`` (settings, guidance scale and interval) run as one batch
        (``sample_group``); each job's images equal ``generate`` with the job's ``sampler_settings``,
        ``class_labels``, ``guidance_scale`` and ``guidance_interval`` (the core sampler) run alone with ``torch.Generator().manual_seed(seed)``
        (up to float rounding of the larger network batch). A group that fails is retried job by
        job, so a failure is returned only for the job that causes it.
        """
        return run_grouped(jobs, lambda job: job.group, self.sample_group)

    @torch.no_grad()
    def sample_group(self, jobs: Sequence[SampleJob]) -> list[torch.Tensor]:
        """Run jobs of identical ``group`` (settings, guidance scale and interval) as one ``generate`` call (the
        core sampler the settings name: ``p_sample_loop``, ``ddim_sample_loop``, ``pc_sample_loop``,
        ``langevin_sample_loop``, ``dpm_solver_sample_loop`` or ``edm_heun_sample_loop``) on all their
        images, with one generator per job (``RowGenerators``) and, when any job has labels, every
        job's labels (-1 for a job without) under classifier-free guidance at the group's scale and interval.

        Returns:
            per job, float32 [num_images, C, H, W] on CPU.

        Raises:
            ValueError: if the jobs' groups differ, or from the core on bad values.
        """
        first = self._one_group(jobs, lambda job: job.group)
        sizes = [job.num_images for job in jobs]
        generators = RowGenerators.from_seeds([job.seed for job in jobs], sizes, self.device)
        shape = (sum(sizes), *self.image_shape)
        x = generate(self.loaded.diffusion, self.network, shape, first.sampler_settings, generators, self.device,
                     class_labels=self._group_labels(jobs, sizes), guidance_scale=first.guidance_scale,
                     guidance_interval=first.guidance_interval)
        return list(x.float().cpu().split(sizes))

    @staticmethod
    def _group_labels(jobs: Sequence[SampleJob] | Sequence[LikelihoodJob], sizes: Sequence[int]) -> list[int] | None:
        """Every job's class labels in job order (-1 for each image of a job without labels), or
        ``None`` when no job has any."""
        if all(job.class_labels is None for job in jobs):
            return None
        return [label for job, size in zip(jobs, sizes)
                for label in (job.class_labels if job.class_labels is not None else (NO_LABEL,) * size)]

    @staticmethod
    def _one_group(jobs: Sequence[_J], key: Callable[[_J], Any]) -> _J:
        """The first job, after checking that all jobs have the same ``key(job)`` (ValueError otherwise)."""
        groups = {key(job) for job in jobs}
        if len(groups) != 1:
            raise ValueError(f"a group needs jobs with one settings tuple, got {sorted(map(repr, groups))}")
        return jobs[0]

    # ------------------------------------------------------------------ likelihood
    def likelihood_many(self, jobs: Sequence[LikelihoodJob]) -> list[list[dict[str, Any]] | Exception]:
        """Bits/dim of every job's images: per job a list with one dict per image (see
        ``likelihood_group``), or the ``Exception`` that job raised.

        Jobs with equal ``settings`` run as one batch (their class labels may differ); each job's
        values equal ``calc_bpd_loop`` ("exact") or ``calc_bpd_estimate`` ("estimate") called alone
        with ``torch.Generator().manual_seed(seed)``, on the network with the job's labels
        (``diffusion_core.guidance.with_class_labels``) for a labelled job (up to float rounding of
        the larger network batch).
        A group that fails is retried job by job.
        """
        return run_grouped(jobs, lambda job: job.settings, self.likelihood_group)

    @torch.no_grad()
    def likelihood_group(self, jobs: Sequence[LikelihoodJob]) -> list[list[dict[str, Any]]]:
        """Bits/dim of the images of jobs with identical ``settings``, in one core call on all of
        them with one generator per job (``RowGenerators``).

        Returns:
            per job, one dict per image: "bpd" (bits/dim of the full bound, prior included); for
            "estimate" also "stderr" (bits/dim) and "num_samples" (K); with ``breakdown`` also
            "prior_bpd" and, for "exact", "terms_bpd" (list [T], L_t in bits/dim, index 0 = decoder
            L_0), for "estimate", "terms_bpd_estimate" (the estimated sum of the T terms).

        Raises:
            ValueError: if the jobs' settings differ, or from the core on bad values.
            RequestError: 422 if a job's images do not match the model (``check_images_for_model``).
        """
        first = self._one_group(jobs, lambda job: job.settings)
        for job in jobs:  # as in make_likelihood_job: a compiled network would not name the bad field
            check_images_for_model(job.pixels, self.image_shape, "pixels")
        pixels = np.concatenate([job.pixels for job in jobs])
        x = torch.from_numpy(uint8_to_float(pixels).transpose(0, 3, 1, 2).copy()).to(self.device)
        sizes = [job.pixels.shape[0] for job in jobs]
        generators = RowGenerators.from_seeds([job.seed for job in jobs], sizes, self.device)
        diffusion, model = self.loaded.diffusion, self.network
        labels = self._group_labels(jobs, sizes)
        if labels is not None:  # the bound on -log p(x | y) for labelled rows, on -log p(x) for the rest
            model = with_class_labels(self.network, labels)
        if first.method == "exact":
            out = diffusion.calc_bpd_loop(model, x, generator=generators)
        else:
            out = diffusion.calc_bpd_estimate(model, x, num_samples=first.num_samples, generator=generators)
        results, start = [], 0
        for job, size in zip(jobs, sizes):
            results.append([self._likelihood_row(out, i, job) for i in range(start, start + size)])
            start += size
        return results

    @staticmethod
    def _likelihood_row(out: dict[str, Any], i: int, job: LikelihoodJob) -> dict[str, Any]:
        """The result dict of image ``i`` of a core bound output ``out`` (see ``likelihood_group``)."""
        row: dict[str, Any] = {"bpd": float(out["total_bpd"][i])}
        if job.method == "estimate":
            row.update(stderr=float(out["stderr"][i]), num_samples=int(out["num_samples"]))
        if job.breakdown:
            row["prior_bpd"] = float(out["prior_bpd"][i])
            if job.method == "exact":
                row["terms_bpd"] = [float(v) for v in out["vb"][i]]
            else:
                row["terms_bpd_estimate"] = float(out["total_bpd"][i] - out["prior_bpd"][i])
        return row


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible to this process (e.g. a replica with ``num_gpus``), else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_runner(model_uri: str, device: str | torch.device | None = None,
                network: NetworkMode = DEFAULT_NETWORK) -> ModelRunner:
    """Fetch ``model_uri`` (``models:/name/version``, ``models:/name@alias``, ``runs:/...``,
    ``s3://...`` or a local folder; see ``pipelines.registry.model_store.fetch_checkpoint``), load it on
    ``device`` (default: ``default_device()``) and resolve its registry identity.

    The downloaded files live in a temporary folder that is removed once the weights are in memory.

    Raises:
        ValueError / FileNotFoundError: from ``fetch_checkpoint`` / ``load_checkpoint`` on a bad
            URI, a missing model or a corrupt checkpoint.
    """
    device = torch.device(device) if device is not None else default_device()
    with tempfile.TemporaryDirectory(prefix="ddpm-serve-") as tmp:
        folder = fetch_checkpoint(model_uri, dst=tmp)
        loaded = load_checkpoint(folder, device=device)
        manifest = read_manifest_summary(folder)
    return ModelRunner(loaded, describe_model(model_uri, loaded.metadata), manifest, network=network)
