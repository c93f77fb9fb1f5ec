"""The MLflow glue of a training run: one MLflow run per Ray Train run, whatever the restarts.

* The driver (``open_run``) creates the run once, logs the whole resolved config as params and
  the data's provenance as tags, and stores the run id in the Ray Train run folder
  (``<storage_path>/<run_name>/mlflow_run_id``); re-submitting the same run name finds it there.
* Rank 0 (``RunTracker``) re-attaches to that run with ``mlflow.start_run(run_id=...)`` and logs.

Exactly-once step metrics: rank 0 buffers them (``MetricBuffer``) and writes them only after the
checkpoint that covers their steps has been reported; that checkpoint also carries them. Steps
after the last checkpoint are recomputed after a restart and were never written, and on restart
the restored checkpoint's buffered steps beyond the last step already in MLflow are written (the
process may have died between reporting the checkpoint and writing them). So the metric history
is continuous, with no step lost or counted twice.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from pipelines.data import storage
from pipelines.registry.tracking_uri import ensure_experiment, mlflow_store
from pipelines.training.config import TrainConfig

RUN_ID_FILE = "mlflow_run_id"
LOSS_KEY = "loss"
_BATCH_LIMIT = 1000  # MLflow's log_batch limit on metrics per call
TIME_KEY = "timestamp_ms"  # in a buffered step entry: when it was measured (Unix ms); not a metric
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's tag of a nested run: the UI lists it under that run


def run_folder(config: TrainConfig) -> storage.Location:
    """The Ray Train run folder ``<storage_path>/<run_name>`` (local or s3://).

    Raises:
        ValueError: if ``train.run_name`` is not set (the driver sets it before launching).
    """
    if not config.train.run_name:
        raise ValueError("train.run_name must be set before the run folder is known")
    return storage.resolve(config.train.storage_path).join(config.train.run_name)


def _read_run_id(folder: storage.Location) -> str | None:
    marker = folder.join(RUN_ID_FILE)
    return storage.read_bytes(marker).decode().strip() if storage.exists(marker) else None


def open_run(config: TrainConfig, tracking_uri: str, manifest: Mapping[str, Any],
             parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """The MLflow run of this training run: the existing one when the run folder names one that
    still exists (resume; the resubmitted config is logged as ``config/resubmitted-<time>.yaml``),
    else a new run with params, tags and the config file logged.

    Args:
        config: resolved config with ``train.run_name`` set.
        tracking_uri: where MLflow is.
        manifest: the shard folder's manifest as a dict (``Manifest.to_dict()``).
        parent_run_id: the MLflow run this one is nested under (tag ``mlflow.parentRunId``: a sweep's
            trial under its sweep run, ``pipelines.tuning``); ``None`` for a top-level run.
        tags: extra tags of a new run (a sweep's trial id); a resumed run keeps the tags it has.

    Returns:
        ``(run_id, resumed)``.
    """
    client = MlflowClient(tracking_uri)
    folder = run_folder(config)
    run_id = _read_run_id(folder)
    if run_id is not None:
        try:
            client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            pass  # the tracking store was replaced: start a new run for this Ray run
        else:  # params are immutable in MLflow: keep the resubmitted config beside the first one
            client.log_text(run_id, config.to_yaml(), f"config/resubmitted-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
            return run_id, True
    experiment_id = ensure_experiment(client, config.tracking.experiment_name, tracking_uri)
    tags = {
        "data.shards": config.data.shards,
        "data.manifest_checksum": str(manifest.get("source_checksum", "")),
        "data.train_images": str(manifest.get("counts", {}).get("train", "")),
        "ray.run_name": config.train.run_name,
        "ray.run_folder": folder.uri,
        **({PARENT_RUN_TAG: parent_run_id} if parent_run_id else {}),
        **dict(tags or {}),
    }
    run = client.create_run(experiment_id, run_name=config.train.run_name, tags=tags)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in config.flat_params().items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    client.log_text(run_id, config.to_yaml(), "config/train_config.yaml")
    client.log_dict(run_id, dict(manifest), "data/manifest.json")
    storage.write_bytes(folder.join(RUN_ID_FILE), run_id.encode())
    return run_id, False


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Give run ``run_id`` its terminal status ("FINISHED", "FAILED" or "KILLED") when the job ends,
    whatever the workers managed to set (a worker killed mid-run leaves its run RUNNING).

    Raises:
        ValueError: on any other status.
    """
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status={status!r} must be FINISHED, FAILED or KILLED")
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


@contextmanager
def ending_run_on_error(tracking_uri: str, run_id: str) -> Iterator[None]:
    """Around the work of run ``run_id``: when the block is interrupted (``KeyboardInterrupt``, which
    ``ray job stop``'s SIGTERM becomes) the run ends KILLED, when it raises it ends FAILED, and the
    exception propagates; the caller ends a run that returns FINISHED. A run that something else has
    already ended meanwhile keeps its status (a sweep's scheduler ends a trial it stops KILLED while
    that trial's Ray Train run is still being torn down)."""
    try:
        yield
    except KeyboardInterrupt:
        _end_if_running(tracking_uri, run_id, "KILLED")
        raise
    except BaseException:
        _end_if_running(tracking_uri, run_id, "FAILED")
        raise


def _end_if_running(tracking_uri: str, run_id: str, status: str) -> None:
    if MlflowClient(tracking_uri).get_run(run_id).info.status == "RUNNING":
        end_run(tracking_uri, run_id, status)


def log_png(client: MlflowClient, run_id: str, png: bytes, artifact_file: str) -> None:
    """Store PNG bytes (as made by ``diffusion_core.images.encode_png``) as the artifact
    ``artifact_file`` of run ``run_id``, unchanged."""
    path = Path(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / path.name
        local.write_bytes(png)
        client.log_artifact(run_id, str(local), str(path.parent) if path.parent != Path(".") else None)


class MetricBuffer:
    """Step metrics held back until a reported checkpoint covers them: ``{step: {name: value}}``.
    Each entry also records, under ``TIME_KEY``, when its step was first added (Unix ms), so that
    MLflow gets the time the metrics were measured rather than the time they were written."""

    def __init__(self, pending: Mapping[int, Mapping[str, float]] | None = None) -> None:
        self._entries: dict[int, dict[str, float]] = {int(s): dict(v) for s, v in (pending or {}).items()}
        self._latest: dict[str, float] = {}

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        """Merge ``metrics`` into the entry of ``step`` (stamped with the current time if new)."""
        entry = self._entries.setdefault(int(step), {TIME_KEY: float(int(time.time() * 1000))})
        entry.update({k: float(v) for k, v in metrics.items()})
        self._latest.update({k: float(v) for k, v in metrics.items()})

    def latest(self) -> dict[str, float]:
        """The last value added of every metric since this buffer was made (taken or not): what
        a report to Ray Train (and so a Ray Tune scheduler) sees of metrics measured at their own
        cadence, such as ``val_bpd`` or ``fd``."""
        return dict(self._latest)

    def pending(self) -> dict[int, dict[str, float]]:
        """A copy of everything not yet taken."""
        return {s: dict(v) for s, v in self._entries.items()}

    def take_through(self, step: int) -> dict[int, dict[str, float]]:
        """Remove and return the entries with step <= ``step``."""
        taken = {s: v for s, v in self._entries.items() if s <= step}
        for s in taken:
            del self._entries[s]
        return taken


class RunTracker:
    """Rank 0's handle on the run: attaches with ``mlflow.start_run(run_id=...)`` (system metrics
    on when asked) and writes metrics, images and text to it. Use as a context manager; inside it
    ``tracking_uri`` is the process's tracking and registry URI (``mlflow_store``); leaving it
    ends the fluent run (status FINISHED, or FAILED on an exception) and restores the URIs."""

    def __init__(self, tracking_uri: str, run_id: str, log_system_metrics: bool) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)
        self._log_system_metrics = log_system_metrics
        self._restore_store = ExitStack()

    def __enter__(self) -> "RunTracker":
        with ExitStack() as stack:
            stack.enter_context(mlflow_store(self.tracking_uri))
            mlflow.start_run(run_id=self.run_id, log_system_metrics=self._log_system_metrics)
            self._restore_store = stack.pop_all()  # kept until __exit__; undone now on an error
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        with self._restore_store:
            mlflow.end_run(status="FAILED" if exc_type is not None else "FINISHED")

    def last_logged_step(self, key: str = LOSS_KEY) -> int:
        """The largest step of metric ``key`` in the run (0 when none)."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=0)

    def log_steps(self, entries: Mapping[int, Mapping[str, float]]) -> None:
        """Write ``{step: {name: value}}`` in as few ``log_batch`` calls as MLflow allows, each
        step's metrics timestamped with its ``TIME_KEY`` entry if it has one (``MetricBuffer``),
        else with the current time."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), int(values.get(TIME_KEY, now)), int(s))
            for s, values in sorted(entries.items()) for k, v in values.items() if k != TIME_KEY
        ]
        for start in range(0, len(metrics), _BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + _BATCH_LIMIT])

    def resume_pending(self, pending: Mapping[int, Mapping[str, float]]) -> int:
        """After a restore: write the restored checkpoint's buffered steps that MLflow does not have
        yet (steps beyond its last ``loss`` step). Returns how many steps were written."""
        last = self.last_logged_step()
        missing = {s: v for s, v in pending.items() if s > last}
        self.log_steps(missing)
        return len(missing)

    def log_png(self, png: bytes, artifact_file: str) -> None:
        """Store PNG bytes as the artifact ``artifact_file`` (e.g. ``samples/step_000100.png``)."""
        log_png(self.client, self.run_id, png, artifact_file)

    def has_metric(self, key: str, step: int) -> bool:
        """Whether metric ``key`` has a value at ``step`` in the run."""
        return any(m.step == step for m in self.client.get_metric_history(self.run_id, key))

    def has_metric_any(self, key: str) -> bool:
        """Whether metric ``key`` has any value in the run."""
        return bool(self.client.get_metric_history(self.run_id, key))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags."""
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def tag(self, key: str) -> str | None:
        """The value of run tag ``key``, or ``None``."""
        return self.client.get_run(self.run_id).data.tags.get(key)
