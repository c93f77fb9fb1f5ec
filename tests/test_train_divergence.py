"""A run that diverges, through ``pipelines/train.py`` and Ray Train on a local instance: the divergence
guard (``train.max_nonfinite_steps`` non-finite steps in a row) stops it with a message naming the
step, the command exits non-zero, the MLflow run ends FAILED, and every checkpoint it left holds
finite weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _train_helpers import EXPERIMENT, run_train_cli
from mlflow import MlflowClient
from safetensors.torch import load_file

from pipelines.registry.tracking_uri import resolve_tracking_uri

pytestmark = pytest.mark.slow

#: Adam without second-moment averaging (beta2 = 0) and a negligible eps divides the momentum by the
#: current gradient's magnitude alone: where a component's gradient is small, the step is huge. At
#: lr 1 without warm-up or clipping the weights reach ~1e31 within four steps and the loss turns
#: NaN (the bounds of every setting are respected; a larger learning rate is refused by the config).
DIVERGING = {"optimizer.lr": 1.0, "optimizer.warmup_steps": 0, "optimizer.grad_clip": 0.0,
             "optimizer.betas": [0.9, 0.0], "optimizer.eps": 1e-30, "train.max_nonfinite_steps": 2}


def test_divergence_fails_the_run_with_a_clear_error_and_no_bad_checkpoint(fmnist_shards: Path,
                                                                          train_sandbox: Path) -> None:
    storage = train_sandbox / "diverging-runs"
    done = run_train_cli(storage, "diverges", {
        **DIVERGING, "data.shards": fmnist_shards, "train.total_steps": 30, "train.log_every": 1,
        "train.checkpoint_every": 1, "train.keep_checkpoints": 30, "train.sample_every": 0, "train.bpd_every": 0,
        "train.final_bpd_images": 0, "scaling.torch_threads": 1, "scaling.max_failures": 0,
        "tracking.experiment_name": EXPERIMENT, "tracking.registered_model_name": None,
    })
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-4000:]
    diverged = re.search(r"training diverged at step (\d+): 2 consecutive steps had a non-finite loss or gradient "
                         r"\(train.max_nonfinite_steps=2\)", output)
    assert diverged, output[-4000:]
    last_step = int(diverged.group(1))
    assert 2 <= last_step < 30

    client = MlflowClient(resolve_tracking_uri())
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'diverges'")
    assert run.info.status == "FAILED"
    assert "ddpm.model_uri" not in run.data.tags  # no model was logged

    checkpoints = sorted((storage / "diverges").glob("checkpoint_0*"))
    steps = [int(path.name.split("_")[1]) for path in checkpoints]
    assert steps == list(range(1, last_step)), steps  # every step before the one that raised
    for path in checkpoints:
        for weights in ("model.safetensors", "raw_model.safetensors"):
            tensors = load_file(path / weights)
            bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
            assert not bad, f"{path.name}/{weights}: non-finite {bad[:3]}"
