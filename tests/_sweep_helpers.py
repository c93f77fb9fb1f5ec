"""The sweeps the tests run (pipelines/sweep.py over configs/tiny_cpu.yaml at its quickest): the spec of
the ASHA sweep that test_sweep.py checks and test_mlflow_ui.py shows, and how to call and read a sweep."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from _train_helpers import FAST, TINY_CONFIG
from mlflow import MlflowClient

from pipelines import sweep
from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.tuning.tracking import children, find_parent

#: The tiny config at its quickest: no grids, bits/dim or system metrics during training; a checkpoint
#: (so a report to Tune) every 2 steps.
QUICK = {**FAST, "train.sample_every": 0, "train.bpd_every": 0, "train.final_bpd_images": 0,
         "train.sample_images": 2, "train.sample_steps": 2, "optimizer.warmup_steps": 0,
         "tracking.log_system_metrics": False, "tracking.experiment_name": "ddpm-sweep-test"}
QUICK.pop("train.total_steps")

ASHA_SWEEP = {
    "metric": "loss", "mode": "min", "max_concurrent_trials": 1,
    "scheduler": {"name": "asha", "time_attr": "step", "grace_period": 2, "reduction_factor": 2},
    "budget": {"train.total_steps": 8},
    # run in this order (one at a time): `good` learns; `frozen` cannot (lr 1e-9), so its loss at the
    # first rung (step 2) is worse than good's and ASHA stops it; `two_workers` splits a global batch
    # of 33 over 2 workers: an invalid combination (each setting is valid alone), so it fails alone.
    "variants": {"good": {"optimizer.lr": 1.0e-2}, "frozen": {"optimizer.lr": 1.0e-9},
                 "two_workers": {"scaling.num_workers": 2}},
    "search_space": {"train.global_batch_size": {"grid_search": [33]}},
}


def cli_args(shards: Path, storage: Path, sweep_file: Path, name: str, *extra: str) -> list[str]:
    """``pipelines/sweep.py`` arguments over configs/tiny_cpu.yaml with ``QUICK``."""
    overrides = [f"{k}={v}" for k, v in {**QUICK, "data.shards": shards, "train.storage_path": storage}.items()]
    return ["--config", str(TINY_CONFIG), "--sweep", str(sweep_file), "--name", name, *extra, *overrides]


def write_sweep(folder: Path, name: str, spec: dict[str, Any]) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # variants run in this order
    return path


def sweep_runs(name: str) -> tuple[Any, list[Any]]:
    """The parent run of sweep ``name`` and its children."""
    client = MlflowClient(resolve_tracking_uri())
    experiment = client.get_experiment_by_name(QUICK["tracking.experiment_name"])
    parent = find_parent(client, experiment.experiment_id, name)
    assert parent is not None, f"no parent run for sweep {name}"
    return parent, children(client, experiment.experiment_id, parent.info.run_id)


#: The sweep name of ``run_asha_sweep``.
ASHA_NAME = "asha-test"


@dataclass(frozen=True)
class SweepOutcome:
    """A finished sweep: its ``train.storage_path``, what ``sweep.main`` printed and its exit status."""

    storage: Path
    out: str
    status: int


def run_asha_sweep(shards: Path, sandbox: Path, folder: Path) -> SweepOutcome:
    """``ASHA_SWEEP`` as ``ASHA_NAME`` with ``--register-best``, checkpoints under ``sandbox/sweep-runs``."""
    storage = sandbox / "sweep-runs"
    args = cli_args(shards, storage, write_sweep(folder, "asha", ASHA_SWEEP), ASHA_NAME, "--register-best")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = sweep.main(args)
    return SweepOutcome(storage=storage, out=out.getvalue(), status=status)
