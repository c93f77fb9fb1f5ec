"""The driver side of a training run: resolve the config, check the data and the cluster before any
worker starts, open (or resume) the MLflow run, and run Ray Train's ``TorchTrainer`` over
``training.loop.train_func``. ``pipelines/train.py`` is the command line around :func:`run`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ray
import ray.data
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from pipelines.common.ray_auth import connect_ray
from pipelines.data import storage
from pipelines.data.shards.manifest import Manifest
from pipelines.data.shards.reader import load_manifest, read_split
from pipelines.evaluation.classifier import load_classifier
from pipelines.registry.feature_store import fetch_feature_net
from pipelines.registry.runs import end_run, ending_run_on_error, open_run, run_folder
from pipelines.registry.tracking_uri import resolve_tracking_uri, run_location
from pipelines.training.config import TrainConfig, load_config
from pipelines.training.loop import train_func
from pipelines.training.splits import training_split


def resolve_config(config_path: str, overrides: Sequence[str]) -> TrainConfig:
    """Load the config, make ``data.shards`` and ``train.storage_path`` absolute (relative to the
    current directory), and name the run ``<config stem>-<YYYYmmdd-HHMMSS>`` unless it is named."""
    config = load_config(config_path, overrides)
    resolved = {"data.shards": storage.resolve(config.data.shards).uri,
                "train.storage_path": storage.resolve(config.train.storage_path).uri}
    if config.train.run_name is None:
        resolved["train.run_name"] = f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return config.replace(resolved)


def check_data(config: TrainConfig) -> dict[str, Any]:
    """Validate the shard folder against the config; return its manifest as a dict.

    Raises:
        ValueError: (``ShardError``) for a missing/incompatible folder, or when the images do not
            fit ``model``, a worker's share of the training split is smaller than one batch, or a
            class-conditional model (``model.num_classes``) gets shards without labels or with
            more named classes than it has.
    """
    manifest = load_manifest(config.data.shards)
    expected = config.model.image_shape
    if tuple(manifest.image_shape) != expected:
        raise ValueError(
            f"data.shards={config.data.shards!r} holds images of shape {list(manifest.image_shape)} but the model "
            f"expects [in_channels, image_size, image_size] = {list(expected)}"
        )
    check_labels(config, manifest)
    per_worker = manifest.counts["train"] // config.scaling.num_workers
    if per_worker < config.per_worker_batch_size:
        raise ValueError(
            f"data.shards={config.data.shards!r} has {manifest.counts['train']} training images: "
            f"{per_worker} per worker, fewer than one per-worker batch of {config.per_worker_batch_size} "
            f"(train.global_batch_size={config.train.global_batch_size} / "
            f"scaling.num_workers={config.scaling.num_workers})"
        )
    return manifest.to_dict()


def check_labels(config: TrainConfig, manifest: Manifest) -> None:
    """For a class-conditional model (``model.num_classes`` = K): every row of the shards has a
    label (``manifest.has_labels``), and the manifest names at most K classes (when it names them;
    IDX shards made without ``--class-names`` do not, and each batch's labels are then checked
    against [0, K) on the workers, ``batches.checked_labels``). Nothing for an unconditional model.

    Raises:
        ValueError: naming ``model.num_classes`` and ``data.shards``.
    """
    num_classes = config.model.num_classes
    if num_classes is None:
        return
    if not manifest.has_labels:
        raise ValueError(
            f"model.num_classes={num_classes} trains a class-conditional model, but data.shards="
            f"{config.data.shards!r} has unlabelled rows (manifest has_labels is false); preprocess a labelled "
            "source (IDX with its labels file, class sub-folders, CIFAR-10) or set model.num_classes=null"
        )
    if len(manifest.classes) > num_classes:
        raise ValueError(
            f"data.shards={config.data.shards!r} has {len(manifest.classes)} classes {list(manifest.classes)}, more "
            f"than model.num_classes={num_classes}; set model.num_classes={len(manifest.classes)}"
        )


def check_fd(config: TrainConfig) -> None:
    """With ``train.fd_every`` > 0: the classifier of ``train.fd_classifier`` can be fetched and
    loaded, and the train and val splits hold enough images for ``train.fd_images`` (checked on
    the driver, before any worker starts).

    Raises:
        ValueError / FileNotFoundError: naming ``train.fd_classifier`` or the short split.
    """
    train = config.train
    if not train.fd_every:
        return
    val = int(load_manifest(config.data.shards).counts.get("val", 0))
    if val < train.fd_images:
        raise ValueError(f"train.fd_images={train.fd_images} needs as many real val images for the FD floor, but "
                         f"split 'val' of {config.data.shards} has {val}; lower train.fd_images")
    with tempfile.TemporaryDirectory(prefix="fd-classifier-check-") as folder:
        try:
            load_classifier(fetch_feature_net(train.fd_classifier, folder))
        except (ValueError, FileNotFoundError, OSError) as err:
            raise FileNotFoundError(
                f"train.fd_classifier={train.fd_classifier!r} is not a loadable FD classifier ({err}); train one "
                "with pipelines/train_classifier.py, or set train.fd_every=0") from err


def build_trainer(config: TrainConfig, loop_config: dict[str, Any],
                  train_loop: Callable[[dict[str, Any]], None] = train_func, callbacks: Sequence[Any] = ()) -> Any:
    """The ``TorchTrainer`` of ``train_loop`` (Ray Train's ``train_loop_per_worker``): scaling, run
    (name, storage, failures, checkpoints, ``callbacks``: Ray Train ``UserCallback``s such as the
    ``TuneReportCallback`` of a sweep's trial), datasets."""
    data_context = ray.data.DataContext.get_current()  # keep job logs readable:
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False  # no plan lines at every epoch of the train split
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}
    ordered = config.data.local_shuffle_buffer == 0
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=config.train.run_name,
            storage_path=config.train.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            callbacks=list(callbacks),
        ),
        datasets={"train": read_split(config.data.shards, training_split("train")).select_columns(
            ["image"] if config.model.num_classes is None else ["image", "label"])},
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"], execution_options=ray.data.ExecutionOptions(preserve_order=ordered)
        ),
    )


def connect_cluster(num_cpus: int | None) -> bool:
    """Connect to Ray as ``common.ray_auth.connect_ray`` does, except that a local instance started
    here (no ``RAY_ADDRESS``) runs Ray's default dashboard process (``include_dashboard`` left to
    Ray: all its modules when ``ray[default]`` is installed) on 127.0.0.1, the first free port
    from 8265 up, with token authentication on. Ray Train's placement-group cleaner asks the State
    API, which that process serves, whether the train controller is alive, once a second, and
    logs a warning each time it cannot.

    Returns:
        True when this call started a local instance (a cluster of fixed size), else False.
    """
    return connect_ray(num_cpus, dashboard_host="127.0.0.1")


def check_resources(config: TrainConfig, fixed_size: bool) -> None:
    """Check that the cluster can host the worker group and still leave Ray Data a CPU (else
    ingest starves and training hangs). Fatal for a fixed-size cluster (the local instance this
    entry point started); a warning otherwise, since an autoscaler may still add nodes.

    Raises:
        ValueError: naming the scaling settings and the cluster's resources (``fixed_size`` only).
    """
    total = ray.cluster_resources()
    scaling = config.scaling
    need_cpu = scaling.num_workers * scaling.cpus_per_worker + 1
    need_gpu = scaling.num_workers if scaling.use_gpu else 0
    if total.get("CPU", 0) >= need_cpu and total.get("GPU", 0) >= need_gpu:
        return
    message = (
        f"scaling.num_workers={scaling.num_workers} x (CPU {scaling.cpus_per_worker}"
        f"{', GPU 1' if scaling.use_gpu else ''}) plus 1 CPU for Ray Data needs CPU {need_cpu}, GPU {need_gpu}; "
        f"the Ray cluster has CPU {total.get('CPU', 0)}, GPU {total.get('GPU', 0)}"
    )
    if fixed_size:
        raise ValueError(f"{message} (raise --num-cpus or lower scaling.cpus_per_worker)")
    print(f"warning: {message}; waiting for the cluster to grow", file=sys.stderr)


def run(config: TrainConfig, num_cpus: int | None = None,
        train_loop: Callable[[dict[str, Any]], None] = train_func, *, parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None, callbacks: Sequence[Any] = (),
        tracking_uri: str | None = None) -> dict[str, Any]:
    """Check the inputs, open (or resume) the MLflow run, train with ``train_loop`` on every worker
    (``training.loop.train_func``; tests wrap it), and return where things went:
    ``{"run_name", "run_folder", "mlflow_run_id", "tracking_uri", "mlflow_run_at", "checkpoint",
    "metrics", "resumed"}`` (``mlflow_run_at``: the run's UI page on a tracking server, else the
    tracking URI; ``registry.tracking_uri.run_location``). The MLflow run ends FINISHED when
    training returns, FAILED when it raises, and KILLED when it is interrupted
    (``KeyboardInterrupt``; ``pipelines/train.py`` turns the SIGTERM of ``ray job stop`` into one),
    also after a resume.

    A sweep's trial (``pipelines.tuning.trial``) runs the same function inside a Ray Tune trial, on
    the cluster the sweep's driver connected to (``connect_cluster`` then starts nothing): its
    MLflow run nested under ``parent_run_id`` with ``tags`` (``registry.runs.open_run``), in the
    sweep's ``tracking_uri`` (default: ``registry.tracking_uri.resolve_tracking_uri()``, which reads
    this process's environment), and ``callbacks`` given to the trainer's ``RunConfig`` (``build_trainer``).

    Raises:
        ValueError: bad shards or resources (before any worker starts); FileNotFoundError: a missing
            FD classifier (``check_fd``).
        ray.train.TrainingFailedError: when training fails more than ``scaling.max_failures`` times.
    """
    manifest = check_data(config)
    check_fd(config)
    started_locally = connect_cluster(num_cpus)
    check_resources(config, fixed_size=started_locally)
    tracking_uri = tracking_uri or resolve_tracking_uri()
    run_id, resumed = open_run(config, tracking_uri, manifest, parent_run_id=parent_run_id, tags=tags)
    loop_config = {"config": config.to_dict(), "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                   "manifest": manifest}
    with ending_run_on_error(tracking_uri, run_id):
        result = build_trainer(config, loop_config, train_loop, callbacks).fit()
    end_run(tracking_uri, run_id, "FINISHED")
    return {
        "run_name": config.train.run_name,
        "run_folder": run_folder(config).uri,
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri,
        "mlflow_run_at": run_location(tracking_uri, run_id),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": dict(result.metrics or {}),
        "resumed": resumed,
    }
