"""The sweep's driver: check the inputs, connect to Ray once, open the parent MLflow run, run (or
restore) the ``Tuner`` whose trials are training runs (``trial.train_driver_fn``), then write the
results table and the best trial's config, and register its model when asked.

Where things go: Tune's experiment folder is ``<train.storage_path>/sweeps/<name>`` (local or s3://;
``Tuner.restore`` reads it back with ``--resume``), with ``trials.csv`` and ``best_config.yaml``
beside Tune's own files; each trial's Ray Train run folder is ``<train.storage_path>/<name>-<trial id>``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from pipelines.data import storage
from pipelines.registry.runs import end_run, ending_run_on_error
from pipelines.registry.tracking_uri import ensure_experiment, resolve_tracking_uri, run_location
from pipelines.training.config import TrainConfig
from pipelines.training.launcher import check_data, check_fd, check_resources, connect_cluster
from pipelines.tuning.concurrency import default_concurrency
from pipelines.tuning.results import best_row, to_csv, to_text, trial_row
from pipelines.tuning.space import param_space
from pipelines.tuning.spec import SweepSpec
from pipelines.tuning.tracking import (
    BEST_METRIC_PREFIX,
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    SweepTracker,
    children,
    open_parent,
    register_model,
)
from pipelines.tuning.trial import TrialContext, train_driver_fn

#: Tune refuses, by default, a result without the sweep's metric; the evaluation metrics (``val_bpd``,
#: ``fd``) are only in the reports after their first measurement, and ASHA skips results without them.
STRICT_METRIC_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
REGISTERED_TAG = "ddpm.registered_model_uri"
#: What a trial's driver function reserves: it only waits on its ``TorchTrainer`` (whose workers and
#: Ray Data reserve their own CPUs), so no CPU (Tune's default is 1, which would starve Ray Data's
#: ingest on a small machine); Tune needs some resource in the trial's bundle, so 1 MiB of memory.
DRIVER_RESOURCES = {"memory": 2**20}


@dataclass(frozen=True)
class SweepRequest:
    """One invocation of ``pipelines/sweep.py``.

    Attributes:
        base: the resolved base config (absolute ``data.shards`` / ``train.storage_path``).
        spec: the sweep, already checked against ``base`` (``SweepSpec.check_against``).
        name: the sweep's name (folder and MLflow parent run name).
        sweep_text: the sweep YAML as given (logged to the parent run).
        resume: restore the interrupted sweep of this name instead of starting one.
        register_best: register the best trial's model as ``base.tracking.registered_model_name``.
        num_cpus: logical CPUs of a local Ray instance started here (no ``RAY_ADDRESS``).
    """

    base: TrainConfig
    spec: SweepSpec
    name: str
    sweep_text: str
    resume: bool = False
    register_best: bool = False
    num_cpus: int | None = None


def sweep_folder(base: TrainConfig, name: str) -> storage.Location:
    """``<train.storage_path>/sweeps/<name>``: Tune's experiment folder."""
    return storage.resolve(base.train.storage_path).join("sweeps", name)


def scheduler(spec: SweepSpec, base: TrainConfig) -> TrialScheduler:
    """ASHA (``stop_last_trials=False``: a trial that reaches the last rung runs to its own end, so a
    trial the scheduler stopped is one that did not return) or FIFO."""
    s = spec.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=s.time_attr, max_t=spec.trial_max_t(base), grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, stop_last_trials=False)


def run_sweep(request: SweepRequest) -> dict[str, Any]:
    """Run (or with ``resume``, finish) the sweep; returns ``{"name", "folder", "parent_run_id",
    "parent_run_at", "rows", "best", "best_config", "results", "registered"}`` (``best``: the best row or
    ``None``; ``best_config`` / ``results``: where the best YAML and the CSV table went). The parent run
    ends FINISHED, FAILED when the Tuner raises, KILLED on ``KeyboardInterrupt``.

    Raises:
        ValueError: bad shards or resources; ``resume`` without a sweep to restore, or a new sweep
            whose folder exists. FileNotFoundError: a missing FD classifier.
    """
    base, spec = request.base, request.spec
    check_data(base)
    check_fd(base)
    started_locally = connect_cluster(request.num_cpus)
    check_resources(base, fixed_size=started_locally)
    folder = sweep_folder(base, request.name)
    if request.resume and not tune.Tuner.can_restore(folder.uri):
        raise ValueError(f"--resume: there is no sweep to resume at {folder.uri}")
    if not request.resume and storage.exists(folder):
        raise ValueError(f"sweep {request.name!r} exists at {folder.uri}: finish it with --resume, or give another "
                         "--name")
    tracking_uri = resolve_tracking_uri()
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, base.tracking.experiment_name, tracking_uri)
    parent_id, _ = open_parent(client, experiment_id, request.name, spec.params(),
                               {"sweep/sweep.yaml": request.sweep_text, "sweep/base_config.yaml": base.to_yaml()})
    print(f"sweep {request.name}: MLflow parent run {parent_id} at {run_location(tracking_uri, parent_id)}", flush=True)
    print(f"sweep folder: {folder.uri} (resume with --name {request.name} --resume)", flush=True)
    context = TrialContext(base.to_dict(), spec, request.name, parent_id, tracking_uri)
    trainable = tune.with_resources(tune.with_parameters(train_driver_fn, context=context), DRIVER_RESOURCES)
    os.environ.setdefault(STRICT_METRIC_ENV, "1")
    with ending_run_on_error(tracking_uri, parent_id):
        if request.resume:
            tuner = tune.Tuner.restore(folder.uri, trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = new_tuner(request, trainable, folder, TrialTracking(tracking_uri, experiment_id, parent_id))
        tuner.fit()
    return finish(request, client, experiment_id, parent_id, folder)


@dataclass(frozen=True)
class TrialTracking:
    """Where the trials' child runs go: MLflow's URI, the experiment and the parent run."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def new_tuner(request: SweepRequest, trainable: Any, folder: storage.Location, tracking: TrialTracking) -> tune.Tuner:
    """The ``Tuner`` of a new sweep: ``param_space`` from the spec, the metric, mode and scheduler,
    ``num_samples``, the trial concurrency (the spec's, else ``default_concurrency``), no retries of
    a failed trial (training retries within a trial, ``scaling.max_failures``), and the
    ``SweepTracker`` callback."""
    spec, base = request.spec, request.base
    concurrency = spec.max_concurrent_trials or default_concurrency(base, ray.cluster_resources())
    tracker = SweepTracker(tracking.tracking_uri, tracking.experiment_id, tracking.parent_run_id, request.name,
                           tuple(spec.search_space))
    parent = folder.uri.rsplit("/", 1)[0]
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler(spec, base),
                                    num_samples=spec.num_samples, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=request.name, storage_path=parent, callbacks=[tracker],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def finish(request: SweepRequest, client: MlflowClient, experiment_id: str, parent_id: str,
           folder: storage.Location) -> dict[str, Any]:
    """The results table (parent artifact ``results/trials.csv`` and ``<folder>/trials.csv``), the best
    trial (parent tags ``ddpm.best_trial_id`` / ``ddpm.best_run_id``, metric ``best_<metric>``), its
    config (parent artifact ``best/train_config.yaml`` and ``<folder>/best_config.yaml``), its model
    registered with ``register_best``; then the parent run ends FINISHED."""
    spec, tracking_uri = request.spec, client.tracking_uri
    rows = [trial_row(run, spec, last_step(client, run.info.run_id)) for run in children(client, experiment_id, parent_id)]
    table = to_csv(rows, spec)
    client.log_text(parent_id, table, "results/trials.csv")
    results = folder.join("trials.csv")
    storage.write_bytes(results, table.encode())
    print(to_text(rows, spec), flush=True)
    best = best_row(rows, spec)
    best_config, registered = None, None
    if best is not None:
        text = read_artifact_text(client, best["run_id"], "config/train_config.yaml")
        client.log_text(parent_id, text, "best/train_config.yaml")
        best_config = folder.join("best_config.yaml")
        storage.write_bytes(best_config, text.encode())
        client.log_metric(parent_id, f"{BEST_METRIC_PREFIX}{spec.metric}", float(best[spec.metric]))
        client.set_tag(parent_id, BEST_TRIAL_TAG, best["trial_id"])
        client.set_tag(parent_id, BEST_RUN_TAG, best["run_id"])
        print(f"best trial {best['trial_id']}: {spec.metric}={best[spec.metric]:.5g} (MLflow run {best['run_id']})")
        print(f"best config: {best_config.uri}", flush=True)
        if request.register_best:
            registered = register_best(request, client, parent_id, best)
    else:
        print(f"no trial reported a finite {spec.metric}: no best config", flush=True)
    end_run(tracking_uri, parent_id, "FINISHED")
    return {"name": request.name, "folder": folder.uri, "parent_run_id": parent_id,
            "parent_run_at": run_location(tracking_uri, parent_id), "rows": rows, "best": best,
            "best_config": best_config.uri if best_config else None, "results": results.uri, "registered": registered}


def register_best(request: SweepRequest, client: MlflowClient, parent_id: str, best: dict[str, Any]) -> str | None:
    """Register the best trial's logged model under ``tracking.registered_model_name``; ``None`` (and a
    line saying why) when that trial logged no model (the scheduler stopped it before its end)."""
    name = request.base.tracking.registered_model_name
    if not best.get("model_uri") or not name:
        print(f"--register-best: trial {best['trial_id']} logged no model (outcome {best['outcome']}); "
              "nothing registered", flush=True)
        return None
    uri = register_model(client.tracking_uri, best["model_uri"], name)
    client.set_tag(parent_id, REGISTERED_TAG, uri)
    print(f"registered the best model as {uri}", flush=True)
    return uri


def last_step(client: MlflowClient, run_id: str) -> int | None:
    """The last step of the run's ``loss`` history (``None`` when it logged none)."""
    history = client.get_metric_history(run_id, "loss")
    return max((m.step for m in history), default=None)


def read_artifact_text(client: MlflowClient, run_id: str, artifact_path: str) -> str:
    """The text of a run's artifact file."""
    with tempfile.TemporaryDirectory(prefix="sweep-artifact-") as folder:
        return Path(client.download_artifacts(run_id, artifact_path, folder)).read_text()
