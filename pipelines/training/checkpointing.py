"""Checkpoints of a training run: every rank's summary and RNG state gathered, the replicas checked
bit-identical and finite, and rank 0's folder handed to ``ray.train.report``, which persists it as
``<train.storage_path>/<train.run_name>/checkpoint_<step:08d>``."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from pipelines.registry.runs import MetricBuffer, run_folder
from pipelines.training.config import TrainConfig
from pipelines.training.state import TrainState, capture_rng_state, save_train_state
from pipelines.training.step import TrainingDivergedError
from pipelines.training.trainee import Trainee
from pipelines.training.worker import Worker


def checkpoint_dir_name(step: int) -> str:
    """The folder name of the checkpoint of ``step`` in the run folder: ``checkpoint_<step:08d>``."""
    return f"checkpoint_{step:08d}"


def checkpoint_path(config: TrainConfig, step: int) -> str:
    """Where Ray Train persists the checkpoint of ``step``: ``<storage_path>/<run_name>/checkpoint_<step>``."""
    return run_folder(config).join(checkpoint_dir_name(step)).uri


def gather_rng_states(worker: Worker) -> list[dict[str, Any]]:
    """Every rank's RNG state (list indexed by rank), via ``all_gather_object`` when distributed."""
    mine = capture_rng_state()
    if worker.world_size == 1:
        return [mine]
    states: list[Any] = [None] * worker.world_size
    dist.all_gather_object(states, mine)
    return states


def weights_digest(net: torch.nn.Module) -> str:
    """sha256 over the bytes of every tensor of ``net.state_dict()`` in order: equal digests mean
    bit-identical weights."""
    digest = hashlib.sha256()
    for tensor in net.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather_replicas(worker: Worker, trainee: Trainee, local_loss: float) -> list[dict[str, Any]]:
    """Every rank's ``{"rank", "host", "pid", "weights_sha256", "local_loss"}`` (list indexed by rank;
    plus ``timestep_sampler_sha256`` with an importance sampler).

    DDP keeps the replicas bit-identical; this is checked at every checkpoint, so a checkpoint is
    never written from replicas that drifted apart (e.g. a rank that skipped an all-reduce), nor
    from non-finite weights.

    Raises:
        TrainingDivergedError: if this rank's weights hold a non-finite value.
        RuntimeError: naming the step and the ranks whose weights (or timestep sampler state)
            differ from rank 0's.
    """
    nonfinite = [name for name, tensor in trainee.net.state_dict().items() if not torch.isfinite(tensor).all()]
    if nonfinite:
        raise TrainingDivergedError(f"step {trainee.step}: rank {worker.rank} holds non-finite weights in "
                                    f"{nonfinite[:5]}; no checkpoint is written")
    mine = {"rank": worker.rank, "host": socket.gethostname(), "pid": os.getpid(),
            "weights_sha256": weights_digest(trainee.net), "local_loss": local_loss}
    if trainee.timestep_sampler is not None:
        mine["timestep_sampler_sha256"] = trainee.timestep_sampler.digest()
    replicas: list[Any] = [mine]
    if worker.world_size > 1:
        replicas = [None] * worker.world_size
        dist.all_gather_object(replicas, mine)
    keys = ("weights_sha256", "timestep_sampler_sha256")
    drifted = [r["rank"] for r in replicas if any(r.get(k) != replicas[0].get(k) for k in keys)]
    if drifted:
        raise RuntimeError(f"step {trainee.step}: the weights or timestep sampler of ranks {drifted} differ from "
                           "rank 0's; the data-parallel replicas are out of sync")
    return replicas


def report_checkpoint(trainee: Trainee, config: TrainConfig, worker: Worker, buffer: MetricBuffer | None,
                      run_id: str, metrics: dict[str, float], local_loss: float, train_seconds: float = 0.0) -> None:
    """All ranks: report step ``trainee.step`` (a collective); rank 0 attaches the checkpoint folder
    (written with ``save_train_state``, including its still-unlogged metrics, the replicas'
    summaries and ``train_seconds``, the run's training time in seconds) to ``ray.train.report``.

    Raises:
        TrainingDivergedError / RuntimeError: non-finite or drifted replicas (``gather_replicas``).
    """
    replicas = gather_replicas(worker, trainee, local_loss)
    rng_states = gather_rng_states(worker)
    report = {"step": trainee.step, **metrics}
    if not worker.is_chief:
        ray.train.report(report)
        return
    state = TrainState(
        step=trainee.step, raw_weights=trainee.net.state_dict(), ema_weights=trainee.ema.state_dict(),
        optimizer=trainee.optimizer.state_dict(), rng_states=rng_states, mlflow_run_id=run_id,
        pending_metrics=buffer.pending() if buffer else {},
        replicas=replicas,
        timestep_sampler=trainee.timestep_sampler.state_dict() if trainee.timestep_sampler else None,
        train_seconds=train_seconds,
    )
    with tempfile.TemporaryDirectory(prefix="ddpm-ckpt-") as folder:
        save_train_state(folder, state, config)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=checkpoint_dir_name(trainee.step))
