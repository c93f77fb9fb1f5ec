"""An evaluation of one model: held-out bits/dim (exact with its per-timestep breakdown, or
estimated) and a sample grid, logged to MLflow as a run of its own tagged with the model it scored.

The scored split is ``val`` (default, the one training reports on) or the source's own ``test``
(``EvalSettings.split``, tagged and logged as ``eval.split``). The metrics are also linked to the
logged model (MLflow 3 ``model_id``) and to the scored data (an MLflow dataset input), so they show on the model's page. ``pipelines/evaluate.py`` is the
command line around :func:`evaluate`.

A class-conditional model (``UNetConfig.num_classes`` = K) is scored twice on the same images and
noise: ``eval_bpd*`` with every label -1 (the bound on -log p(x), comparable with an unconditional
model's) and ``eval_*_cond`` with the split's true labels (the bound on -log p(x | y)). Its grid
has one row per class of ``EvalSettings.class_labels`` and its FD samples are class-balanced over
them (sample i of class ``classes[i % len(classes)]``), drawn with classifier-free guidance at
``EvalSettings.guidance_scale``; with classifier features the FD classifier's predictions of those
samples give the class accuracy (``conditioning.class_accuracy``). With
``EvalSettings.guidance_interval`` (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited
Interval Improves Sample and Distribution Quality in Diffusion Models") the grid and the FD samples
are guided only at the noise levels sigma_t = sqrt(1 / abar_t - 1) inside the interval and use the
conditional model at the others (``diffusion_core.guidance``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient

from diffusion_core.checkpoint import LoadedModel, load_checkpoint
from diffusion_core.generate import SamplerSettings, guided_network_evaluations
from diffusion_core.guidance import NO_LABEL, GuidanceInterval, check_guidance_interval, guidance_evaluations
from diffusion_core.inference_network import build_inference_network
from diffusion_core.validation import check_choice, check_int_in_range, check_number_in, check_positive_int
from pipelines.data.shards.reader import load_manifest, read_split_numpy
from pipelines.data.storage import resolve
from pipelines.evaluation.classifier import ClassifierFeatures
from pipelines.evaluation.conditioning import class_accuracy, class_names, predicted_classes, resolve_class_labels
from pipelines.evaluation.fd_eval import FDSettings, run_fd
from pipelines.evaluation.features import build_feature_net
from pipelines.evaluation.metrics import (
    bound_blocks,
    class_balanced_labels,
    class_grid_labels,
    plot_bpd_terms,
    sample_grid,
    sampler_params,
    summarize_estimate,
    summarize_exact,
)
from pipelines.evaluation.split_bound import bound_distributed
from pipelines.registry.model_identity import describe_model
from pipelines.registry.model_store import fetch_checkpoint
from pipelines.registry.runs import log_png
from pipelines.registry.tracking_uri import ensure_experiment, mlflow_store, resolve_tracking_uri, run_location

DEFAULT_EXPERIMENT = "ddpm-eval"
#: Splits an evaluation may score ("train" is what the model was fitted on).
EvalSplit = Literal["val", "test"]
EVAL_SPLITS = get_args(EvalSplit)


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how (the flags of ``pipelines/evaluate.py``).

    Attributes:
        model: a model URI or checkpoint folder (anything ``fetch_checkpoint`` takes).
        shards: the shard folder (local or s3://) whose ``split`` is scored.
        images: the first N >= 1 images of the split; ``None``: all of them.
        estimate: K timesteps per image for the estimated bound; 0 computes the exact bound.
        exact_images: with ``estimate``, also the exact bound on the first M of those images
            (0: none); without it the exact bound covers all ``images`` already.
        workers: spread the bound over this many Ray actors (Ray Data, one CPU or GPU each,
            ``split_bound``); 0: in this process.
        samples: images in the sample grid (0: none).
        sampling: the grid's sampler and its parameters (default: DDIM, 50 steps, eta = 0);
            ``sample_steps`` is its ``num_steps``.
        batch_size: images per forward pass; seed: seed of the bound's noise and the samples.
        experiment: MLflow experiment (``None``: the training run's, else ``DEFAULT_EXPERIMENT``).
        device: torch device; threads: torch intra-op threads (``None``: torch's choice).
        compile: run the UNet through ``torch.compile`` (inductor) for the bound and the samples
            computed in this process (``compiled_network``: falls back to the eager module, with a
            warning, when compiling fails); the Ray actors of ``workers`` run it eagerly.
        fd: the Fréchet distance of ``fd.images`` samples drawn with ``sampling`` over Ray, and its
            floor (``fd_eval.FDSettings``); ``None``: no FD.
        split: "val" (default) or "test" (the source's own test split, when the shards have one).
        class_labels: ``--class-label``'s values for a class-conditional model: "all", label
            indices or class names of the manifest (``conditioning.resolve_class_labels``);
            ``None``: every class. A label for an unconditional model is an error.
        guidance_scale: s >= 0 of the grid's and the FD's classifier-free guidance (1: the
            conditional model; 0: the unconditional one; else two network evaluations per step).
            Only 1.0 for an unconditional model.
        guidance_interval: ``(sigma_lo, sigma_hi)``, 0 <= sigma_lo < sigma_hi (sigma_hi may be
            ``inf``), in the units of the noise level sigma_t = sqrt(1 / abar_t - 1) (EDM's sigma
            of the VP chain): the grid and the FD samples are guided at ``guidance_scale`` only at
            the timesteps with sigma_lo < sigma_t <= sigma_hi and use the conditional model (one
            network evaluation per image) at the others (Kynkaanniemi et al. 2024, "Applying
            Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion
            Models"; ``diffusion_core.guidance``). ``None``: every timestep is guided. Needs a
            ``guidance_scale`` other than 0 and 1 (those do not guide) and a class-conditional
            model (``evaluate`` refuses it for an unconditional one). Stored as a tuple of two floats.

    Raises:
        ValueError: naming the field, on a value out of range; naming ``guidance_interval`` on an
            invalid interval or one given with ``guidance_scale`` 0 or 1.
    """

    model: str
    shards: str
    images: int | None = 64
    estimate: int = 0
    exact_images: int = 0
    workers: int = 0
    samples: int = 16
    sampling: SamplerSettings = field(default_factory=lambda: SamplerSettings("ddim", 50))
    batch_size: int = 64
    seed: int = 0
    experiment: str | None = None
    device: str = "cpu"
    threads: int | None = None
    compile: bool = False
    fd: FDSettings | None = None
    split: EvalSplit = "val"
    class_labels: tuple[str, ...] | None = None
    guidance_scale: float = 1.0
    guidance_interval: GuidanceInterval | None = None

    def __post_init__(self) -> None:
        check_choice("split", self.split, EvalSplit)
        check_number_in("guidance_scale", self.guidance_scale, 0.0, float("inf"), high_open=True)
        if self.guidance_interval is not None:
            check_guidance_interval(self.guidance_interval)
            object.__setattr__(self, "guidance_interval", tuple(float(v) for v in self.guidance_interval))
            if guidance_evaluations(self.guidance_scale) == 1:
                raise ValueError(f"guidance_interval={self.guidance_interval!r} needs a guidance_scale other than "
                                 f"0 and 1 (got {self.guidance_scale:g}, which does not guide)")
        if self.images is not None:
            check_positive_int("images", self.images)
        check_int_in_range("exact_images", self.exact_images, 0)
        check_int_in_range("workers", self.workers, 0)
        if self.exact_images and not self.estimate:
            raise ValueError("exact_images needs estimate K > 0 (without it the exact bound covers all images)")
        if self.images is not None and self.exact_images > self.images:
            raise ValueError(f"exact_images={self.exact_images} is more than images={self.images}")

    @property
    def sample_steps(self) -> int:
        """``sampling.num_steps``, the grid's steps (the setting's name before other samplers existed)."""
        return self.sampling.num_steps


def load_validation(
    shards: str, image_shape: tuple[int, int, int], limit: int | None, split: str = "val"
) -> tuple[np.ndarray, dict[str, Any]]:
    """The first ``limit`` images ``[N, C, H, W]`` (float32, [-1, 1]) of ``split`` (``None``: all)
    and the manifest (:func:`load_labelled_split` without the labels)."""
    images, _, manifest = load_labelled_split(shards, image_shape, limit, split)
    return images, manifest


def load_labelled_split(
    shards: str, image_shape: tuple[int, int, int], limit: int | None, split: str = "val"
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The first ``limit`` images ``[N, C, H, W]`` (float32, [-1, 1]) of ``split`` (``None``: all),
    their labels (int64 ``[N]``, -1 where unknown) and the manifest.

    Raises:
        ValueError: (``ShardError``) on a bad shard folder, images of another shape than the
            model's, or shards without that split (e.g. "test" of a source that has none).
    """
    check_choice("split", split, EvalSplit)
    manifest = load_manifest(shards)
    if tuple(manifest.image_shape) != tuple(image_shape):
        raise ValueError(f"--shards {shards} holds images of shape {list(manifest.image_shape)}, "
                         f"the model expects {list(image_shape)}")
    if manifest.counts[split] == 0:
        present = ", ".join(f"{name} {count}" for name, count in manifest.counts.items() if count) or "none"
        hint = (" (its source had no test split of its own: preprocess one that has, e.g. the IDX t10k files, "
                "a test/ folder or CIFAR-10's test_batch.bin)" if split == "test" else "")
        raise ValueError(f"--shards {shards} has no {split} split: no {split} images (splits with images: {present}){hint}")
    images, labels = read_split_numpy(shards, split, limit=limit)
    return images, labels.astype(np.int64, copy=False), manifest.to_dict()



def compiled_network(model: torch.nn.Module, image_shape: tuple[int, int, int],
                     device: str | torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The UNet through ``torch.compile`` (inductor, a dynamic batch size;
    ``diffusion_core.inference_network``, mode "compiled"), compiled now on one image so that a
    failure shows here; the eager ``model`` itself when compiling fails (e.g. no C++ compiler for
    inductor's CPU code), with a warning on stderr saying why: both compute the same network
    (outputs within float32 rounding, ``tests/test_compile.py``).

    Args:
        model: the UNet in eval mode on ``device``; image_shape: (C, H, W) of its images.
    """
    print("compiling the UNet with torch.compile (inductor); the first batch of two or more images "
          "compiles once more (one graph for every larger batch size)", file=sys.stderr, flush=True)
    built = build_inference_network(model, "compiled", image_shape, device, warmup=(1,))
    if built.reason is not None:
        print(f"warning: torch.compile failed ({built.reason}); using the eager network", file=sys.stderr, flush=True)
    return built.forward


def eval_method(args: EvalSettings) -> str:
    """The ``eval.method`` tag: how the bound was computed."""
    where = f" over {args.workers} Ray actors" if args.workers else ""
    if not args.estimate:
        return f"exact calc_bpd_loop{where}"
    exact = f" + exact calc_bpd_loop on {args.exact_images}" if args.exact_images else ""
    return f"estimate K={args.estimate}{exact}{where}"


def bound_metrics(args: EvalSettings, folder: Path, loaded: LoadedModel, network: Callable[..., torch.Tensor],
                  images: np.ndarray, labels: np.ndarray | None = None,
                  suffix: str = "") -> tuple[dict[str, float], dict[str, Any]]:
    """The bound of ``images`` (estimated with K = ``args.estimate``, and/or exact), in this process
    through ``network`` or over ``args.workers`` Ray actors (``split_bound``); for a class-conditional
    model given ``labels`` (int64 ``[N]`` in [-1, K): -1 for the bound on -log p(x), the true labels
    for -log p(x | y)), with ``suffix`` appended to every metric name and plot name ("_cond").

    Returns:
        ``(metrics, artifacts)``: metrics in bits/dim, "eval_bpd_estimate*" (total, its standard
        errors from the timestep sampling and over images, L_T "_prior", L_0 "_decoder", sum of
        L_t for t >= 1 "_terms") and "eval_bpd", "eval_prior_bpd", "eval_decoder_bpd",
        "eval_terms_bpd" for the exact bound; artifacts: "plots" {artifact path: PNG bytes},
        "terms" (the per-timestep JSON) and "exact_images" (how many had the exact bound).
    """
    def rows(num_samples: int, subset: np.ndarray) -> dict[str, np.ndarray]:
        part = None if labels is None else labels[: len(subset)]
        if args.workers:
            return bound_distributed(folder, subset, num_samples, block_size=args.batch_size, seed=args.seed,
                                     workers=args.workers, threads=args.threads or 1, class_labels=part)
        x = torch.from_numpy(subset).to(args.device)
        return bound_blocks(loaded.diffusion, network, x, num_samples, args.seed, args.batch_size,
                            class_labels=None if part is None else torch.from_numpy(part))

    metrics: dict[str, float] = {}
    plots: dict[str, bytes] = {}
    terms: dict[str, Any] = {}
    if args.estimate:
        est = summarize_estimate(rows(args.estimate, images), loaded.diffusion.num_timesteps, args.estimate)
        named = {"eval_bpd_estimate": "bpd", "eval_bpd_estimate_stderr": "bpd_stderr",
                 "eval_bpd_estimate_stderr_images": "bpd_stderr_images", "eval_bpd_estimate_prior": "prior_bpd",
                 "eval_bpd_estimate_decoder": "decoder_bpd", "eval_bpd_estimate_terms": "terms_bpd"}
        metrics.update({name: est[key] for name, key in named.items() if est[key] is not None and np.isfinite(est[key])})
        plots[f"eval/bpd_per_timestep_estimate{suffix}.png"] = plot_bpd_terms(
            est["per_t"], est["prior_bpd"], f"{args.model}: {est['bpd']:.3f} bits/dim (K={args.estimate}, per stratum)")
        terms.update(estimate_per_t_bpd=est["per_t"].tolist(), prior_bpd=est["prior_bpd"])
    exact_count = args.exact_images if args.estimate else len(images)
    if exact_count:
        exact = summarize_exact(rows(0, images[:exact_count]))
        metrics.update(eval_bpd=exact["bpd"], eval_prior_bpd=exact["prior_bpd"], eval_decoder_bpd=exact["decoder_bpd"],
                       eval_terms_bpd=exact["terms_bpd"])
        if np.isfinite(exact["bpd_stderr_images"]):
            metrics["eval_bpd_stderr_images"] = exact["bpd_stderr_images"]
        plots[f"eval/bpd_per_timestep{suffix}.png"] = plot_bpd_terms(exact["vb_per_t"], exact["prior_bpd"],
                                                            f"{args.model}: {exact['bpd']:.3f} bits/dim")
        terms.update(vb_per_t_bpd=exact["vb_per_t"].tolist(), prior_bpd=exact["prior_bpd"])
    return {f"{name}{suffix}": value for name, value in metrics.items()}, \
        {"plots": plots, "terms": terms, "exact_images": exact_count}


def resolve_conditioning(args: EvalSettings, num_classes: int | None,
                         manifest: dict[str, Any]) -> tuple[tuple[int, ...] | None, tuple[str, ...]]:
    """The labels to sample (``args.class_labels`` resolved against the manifest's class names;
    every class when not given) and the names of labels 0..K-1; ``(None, ())`` for an
    unconditional model.

    Raises:
        ValueError: naming ``--class-label``, ``--guidance-scale`` or ``--guidance-interval`` for an
            unconditional model, or on an unknown label (``conditioning.resolve_class_labels``).
    """
    if num_classes is None:
        flags = [f"--guidance-scale {args.guidance_scale:g}"] if args.guidance_scale != 1.0 else []
        if args.guidance_interval is not None:
            flags.append("--guidance-interval " + " ".join(f"{v:g}" for v in args.guidance_interval))
        if flags:
            raise ValueError(f"{' '.join(flags)}: this model is unconditional "
                             "(UNetConfig.num_classes is null); there is nothing to guide")
        resolve_class_labels(args.class_labels, None)
        return None, ()
    names = class_names(manifest.get("classes") or (), num_classes)
    return resolve_class_labels(args.class_labels, num_classes, names), names


def format_guidance_interval(guidance_interval: GuidanceInterval | None) -> str:
    """The ``guidance_interval`` MLflow param: ``"LO,HI"`` (each ``repr(float)``, e.g.
    ``"0.28,5.42"``, ``"0.5,inf"``), or ``"none"`` for ``None`` (every timestep guided)."""
    if guidance_interval is None:
        return "none"
    return ",".join(repr(float(v)) for v in guidance_interval)


def guidance_params(args: EvalSettings, classes: tuple[int, ...], diffusion: Any) -> dict[str, Any]:
    """MLflow params of a conditional model's samples: the labels (``class_labels``, "k1,k2,..."),
    the guidance scale (``guidance_scale``), the guidance interval (``guidance_interval``,
    :func:`format_guidance_interval`) and the network evaluations per image of one guided draw with
    ``args.sampling`` (``sample_guided_network_evaluations``,
    ``diffusion_core.generate.guided_network_evaluations``: a doubled batch counts 2 per image; with
    an interval only the model calls at guided timesteps are doubled).

    Args:
        args: the evaluation's settings; classes: the labels sampled; diffusion: the model's
            ``GaussianDiffusion``.

    Raises:
        ValueError: if ``args.sampling`` does not fit the model (num_steps > T).
    """
    return {"class_labels": ",".join(str(k) for k in classes), "guidance_scale": args.guidance_scale,
            "guidance_interval": format_guidance_interval(args.guidance_interval),
            "sample_guided_network_evaluations": guided_network_evaluations(
                diffusion, args.sampling, args.guidance_scale, args.guidance_interval)}


def conditional_bounds(args: EvalSettings, folder: Path, loaded: LoadedModel, network: Callable[..., torch.Tensor],
                       images: np.ndarray, labels: np.ndarray) -> tuple[dict[str, float], dict[str, Any]]:
    """A class-conditional model's two bounds on the same images and noise (:func:`bound_metrics`):
    every label -1 (the bound on -log p(x): ``eval_bpd*``, comparable with an unconditional
    model's) and, when every scored image has a label, the true labels (-log p(x | y): the same
    names with ``_cond``). Their difference estimates the information the label carries about the
    image (``diffusion_core.guidance``); it is not a bound.

    Returns:
        ``(metrics, artifacts)`` as :func:`bound_metrics`, the conditional per-timestep terms as
        ``artifacts["terms_cond"]``.
    """
    metrics, artifacts = bound_metrics(args, folder, loaded, network, images,
                                       np.full(len(images), NO_LABEL, dtype=np.int64))
    if len(labels) and labels.min() < 0:
        print("note: the scored split has unlabelled images: no conditional bound (eval_bpd*_cond)",
              file=sys.stderr, flush=True)
        return metrics, artifacts
    cond, cond_artifacts = bound_metrics(args, folder, loaded, network, images, labels, suffix="_cond")
    metrics.update(cond)
    artifacts["plots"].update(cond_artifacts["plots"])
    artifacts["terms_cond"] = cond_artifacts["terms"]
    return metrics, artifacts


def evaluate(args: EvalSettings) -> dict[str, Any]:
    """Run the evaluation and log it (the sampler settings as ``sample_*`` params, see
    ``metrics.sampler_params``; for a class-conditional model also :func:`guidance_params`:
    ``class_labels``, ``guidance_scale``, ``guidance_interval`` and
    ``sample_guided_network_evaluations``). The grid and the FD samples are drawn with
    ``args.guidance_scale`` within ``args.guidance_interval``.

    Returns:
        ``{"metrics": {name: bits/dim}, "run_id", "experiment_id", "tracking_uri", "run_at", "artifact_uri",
        "model": ModelIdentity, "class_names": {label: name}}`` (``run_at``: the run's UI page on a
        tracking server, else the tracking URI; ``registry.tracking_uri.run_location``;
        ``class_names``: the classes sampled, empty for an unconditional model). A conditional
        model's metrics add the ``*_cond`` bounds and, with classifier FD features,
        ``sample_class_accuracy`` (overall) and ``sample_class_accuracy_<k>`` (per class), in [0, 1].

    Raises:
        ValueError / FileNotFoundError: on a bad model URI, a missing model or bad shards, or
            sampler settings that do not fit the model (``num_steps`` > T; checked before the
            bound is computed, when samples are drawn); naming ``--class-label``,
            ``--guidance-scale`` or ``--guidance-interval`` when given to an unconditional model
            (before the bound is computed), or on an unknown class.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    tracking_uri = resolve_tracking_uri()
    client = MlflowClient(tracking_uri)
    folder = fetch_checkpoint(args.model)
    loaded = load_checkpoint(folder, device=args.device)
    if loaded.unet_config.num_classes is None:  # flags an unconditional model cannot take fail first
        resolve_conditioning(args, None, {})
    in_process = bool(args.samples) or not args.workers  # with workers and no grid, the actors run the network
    network = compiled_network(loaded.model, loaded.unet_config.image_shape, args.device) \
        if args.compile and in_process else loaded.model
    source = describe_model(args.model, loaded.metadata, client)
    shape = loaded.unet_config.image_shape
    draws_samples = bool(args.samples) or args.fd is not None  # the sampler settings only matter then
    sampling_params = sampler_params(args.sampling, loaded.diffusion.num_timesteps) if draws_samples else {}
    shards = resolve(args.shards).uri
    images, true_labels, manifest = load_labelled_split(shards, shape, args.images, args.split)
    classes, names = resolve_conditioning(args, loaded.unet_config.num_classes, manifest)
    if classes is not None and draws_samples:
        sampling_params.update(guidance_params(args, classes, loaded.diffusion))
    net = None
    if args.fd is not None:  # bad FD flags (classifier, weights file) fail before the bound is computed
        net = build_feature_net(args.fd.features, args.fd.classifier, args.fd.inception_weights, args.device)
        expected = getattr(net, "image_shape", None)
        if expected is not None and tuple(expected) != tuple(shape):
            raise ValueError(f"--fd-classifier takes images of shape {list(expected)}, the model makes {list(shape)}")
    metrics, artifacts = conditional_bounds(args, folder, loaded, network, images, true_labels) \
        if classes is not None else bound_metrics(args, folder, loaded, network, images)
    fd_params: dict[str, Any] = {}
    fd_tags: dict[str, str] = {}
    if args.fd is not None:
        fd_out = run_fd(folder, shards, net, args.fd, args.sampling, args.seed, threads=args.threads or 1,
                        classes=classes, guidance_scale=args.guidance_scale,
                        guidance_interval=args.guidance_interval)
        metrics.update(fd=fd_out["fd"], fd_floor=fd_out["fd_floor"])
        if classes is not None and isinstance(net, ClassifierFeatures):
            asked = class_balanced_labels(args.fd.images, classes).numpy()
            metrics.update(class_accuracy(predicted_classes(net.model, fd_out["samples"]), asked, classes))
        fd_params = {"fd_images": args.fd.images, "fd_features": args.fd.features,
                     "fd_reference_split": fd_out["reference"].split, "fd_reference_images": fd_out["reference"].count,
                     "fd_floor_split": fd_out["floor"].split, "fd_floor_start": fd_out["floor"].start,
                     "fd_block_size": args.fd.block_size}
        fd_tags = {"fd.features_identity": net.identity, "fd.cache": fd_out["cache_folder"],
                   "fd.reference_cache_hit": str(fd_out["reference_cache_hit"]).lower()}
    grid = None
    if args.samples and classes is None:
        grid = sample_grid(loaded.diffusion, network, shape, args.samples, args.sampling, args.seed)[1]
    elif args.samples:  # one row per class
        per_class = -(-args.samples // len(classes))
        grid = sample_grid(loaded.diffusion, network, shape, per_class * len(classes), args.sampling, args.seed,
                           class_labels=class_grid_labels(classes, per_class), guidance_scale=args.guidance_scale,
                           guidance_interval=args.guidance_interval, nrow=per_class)[1]

    experiment = args.experiment
    if experiment is None and source.run_id:
        try:
            experiment = client.get_experiment(client.get_run(source.run_id).info.experiment_id).name
        except mlflow.exceptions.MlflowException:
            experiment = None
    experiment_id = ensure_experiment(client, experiment or DEFAULT_EXPERIMENT, tracking_uri)
    tags = {"eval.model_uri": source.uri, "eval.shards": shards, "eval.split": args.split, "eval.images": str(len(images)),
            "eval.method": eval_method(args),
            "data.manifest_checksum": str(manifest.get("source_checksum", "")), **fd_tags}
    tags.update({k: v for k, v in (("eval.model_name", source.name), ("eval.model_version", source.version),
                                   ("eval.source_run_id", source.run_id)) if v})
    with mlflow_store(tracking_uri), \
            mlflow.start_run(experiment_id=experiment_id, run_name=f"eval-{Path(source.uri).name}", tags=tags) as run:
        dataset = mlflow.data.from_numpy(images, source=shards, name=f"{args.split}[:{len(images)}]",
                                         digest=str(manifest.get("source_checksum", ""))[:36] or None)
        mlflow.log_input(dataset, context="evaluation")
        mlflow.log_params({"eval.split": args.split, "images": len(images), "estimate_k": args.estimate,
                           "exact_images": artifacts["exact_images"], "bound_workers": args.workers, "seed": args.seed,
                           "samples": args.samples, **sampling_params, **fd_params})
        mlflow.log_metrics(metrics, model_id=source.model_id, dataset=dataset)
        for name, png in artifacts["plots"].items():
            log_png(client, run.info.run_id, png, name)
        if artifacts["terms"]:
            mlflow.log_dict(artifacts["terms"], "eval/bpd_terms.json")
        if artifacts.get("terms_cond"):
            mlflow.log_dict(artifacts["terms_cond"], "eval/bpd_terms_cond.json")
        if grid is not None:
            log_png(client, run.info.run_id, grid, "eval/samples.png")
    return {"metrics": metrics, "run_id": run.info.run_id, "experiment_id": experiment_id,
            "tracking_uri": tracking_uri, "run_at": run_location(tracking_uri, run.info.run_id, experiment_id),
            "artifact_uri": run.info.artifact_uri, "model": source,
            "class_names": {} if classes is None else {k: names[k] for k in classes}}
