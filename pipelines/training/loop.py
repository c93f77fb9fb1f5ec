"""The per-worker training loop that Ray Train runs on every worker (``train_func``).

Each worker builds its trainee (``trainee.build_trainee``: the UNet with the same seed, the
checkpoint Ray Train hands over restored, DDP-wrapped), and loops over its shard of the training
data (``batches.iterate_epochs``), epoch after epoch, until ``train.total_steps`` optimizer steps
(``step.train_step``) are done or the wall-time budget (``time_budget``) is spent.

Rank 0 alone talks to MLflow and draws sample grids and bits/dim (``chief``); every rank takes
part in the checkpoints (``checkpointing``). After a restart the data epoch starts again from its
beginning; the step count, weights, EMA, optimizer and RNG states continue from the checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from diffusion_core.diffusion import GaussianDiffusion
from pipelines.registry.runs import RunTracker
from pipelines.training.batches import TrainingBatch, iterate_epochs, load_val_subset
from pipelines.training.checkpointing import checkpoint_path, report_checkpoint
from pipelines.training.chief import ChiefDuties, measure_fd
from pipelines.training.config import TrainConfig
from pipelines.training.fd_monitor import TrainingFD
from pipelines.training.progress import ProgressLog
from pipelines.training.state import TrainState
from pipelines.training.step import learning_rate, train_step
from pipelines.training.tags import RESUMED_FROM_TAG
from pipelines.training.time_budget import TimeBudget
from pipelines.training.trainee import Trainee, build_trainee, restore_state
from pipelines.training.window import Window
from pipelines.training.worker import Worker, configure_torch, current_worker


@dataclass(frozen=True)
class RunContext:
    """What one worker's loop runs with, fixed for the attempt (the ``Trainee`` holds what changes).

    Attributes:
        config: the run's config.
        worker: this worker's rank, world size and device.
        diffusion: the diffusion process of ``config.diffusion``.
        bf16: whether the step runs under bf16 autocast (``worker.configure_torch``).
        run_id: the MLflow run, recorded in every checkpoint.
        budget: the wall-time budget ``train.max_minutes`` (counting earlier attempts' seconds).
        chief: rank 0's duties; ``None`` on the other ranks.
        fd: the FD during training (``train.fd_every``); ``None`` when off.
    """

    config: TrainConfig
    worker: Worker
    diffusion: GaussianDiffusion
    bf16: bool
    run_id: str
    budget: TimeBudget
    chief: ChiefDuties | None = None
    fd: TrainingFD | None = None


def train_func(loop_config: dict[str, Any], clock: Callable[[], float] = time.monotonic) -> None:
    """Ray Train's ``train_loop_per_worker``.

    Args:
        loop_config: ``{"config": TrainConfig.to_dict(), "mlflow_run_id": str,
            "tracking_uri": str, "manifest": dict}`` built by ``training.launcher``.
        clock: seconds of a monotonic clock, for the wall-time budget and the progress ETA.
    """
    config = TrainConfig.from_dict(loop_config["config"])
    worker = current_worker()
    bf16 = configure_torch(config.scaling, worker.device)
    state = restore_state(worker)
    trainee = build_trainee(config, worker, state)
    base = RunContext(config=config, worker=worker, diffusion=GaussianDiffusion(config.diffusion), bf16=bf16,
                      run_id=loop_config["mlflow_run_id"],
                      budget=TimeBudget(config.train.max_minutes, state.train_seconds if state else 0.0, clock=clock),
                      fd=TrainingFD(config, worker.rank, worker.world_size) if config.train.fd_every else None)
    if not worker.is_chief:
        run_loop(base, trainee)
        return
    tracker = RunTracker(loop_config["tracking_uri"], base.run_id, config.tracking.log_system_metrics)
    with tracker:
        chief = open_chief(base, tracker, state, clock)
        run_loop(replace(base, chief=chief), trainee)
        chief.finalize(trainee, worker.device, loop_config["manifest"])


def open_chief(ctx: RunContext, tracker: RunTracker, state: TrainState | None,
               clock: Callable[[], float]) -> ChiefDuties:
    """Rank 0's duties on the open MLflow run: tags a resume, loads the validation subset, and
    re-buffers the restored checkpoint's unconfirmed metrics."""
    if state is not None:
        tracker.set_tags({RESUMED_FROM_TAG: str(state.step)})
    val_images, val_labels = load_val_subset(ctx.config)
    start_step = state.step if state else 0
    progress = ProgressLog(ctx.config.train.total_steps, start_step, clock=clock)
    return ChiefDuties(ctx.config, tracker, ctx.diffusion, val_images, state.pending_metrics if state else {},
                       start_step=start_step, progress=progress, val_labels=val_labels)


def run_loop(ctx: RunContext, trainee: Trainee) -> None:
    """Train until ``train.total_steps``, or until the wall-time budget (``train.max_minutes``) is
    spent at a log step (by rank 0's clock, on every rank at once): step, log windows, periodic
    evaluation (rank 0; the FD on every rank), checkpoints."""
    train, chief = ctx.config.train, ctx.chief
    ctx.budget.start()
    if trainee.step >= train.total_steps or ctx.budget.spent(ctx.worker.world_size):
        return
    if chief is not None:
        chief.progress.budget_ends_at = ctx.budget.ends_at()
    trainee.model.train()
    window = Window(ctx.diffusion.num_timesteps, ctx.worker.device)
    last_metrics: dict[str, float] = {}
    for index, batch in enumerate(iterate_epochs(ctx.config, ctx.worker)):
        losses, t, grad_norm = timed_step(ctx, trainee, batch, first=index == 0)
        window.add(losses, t, grad_norm)
        step = trainee.step
        done = is_last_step(ctx, step)
        if step % train.log_every == 0 or done:
            last_metrics = log_window(ctx, window, step)
        if chief is not None:
            chief.periodic(trainee, ctx.worker.device)
        if ctx.fd is not None and ctx.fd.due(step):
            measure_fd(ctx.fd, trainee, ctx.config, ctx.diffusion, ctx.worker.device, chief)
        if step % train.checkpoint_every == 0 or done:
            checkpoint(ctx, trainee, last_metrics, float(losses.mean()))
        if done:
            return


def timed_step(ctx: RunContext, trainee: Trainee, batch: TrainingBatch,
               first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``step.train_step`` on ``batch`` (its images, and its labels for a conditional model); with ``scaling.compile``, rank 0 says that the ``first`` step of the
    attempt compiles the UNet, and how long it took."""
    announce = first and ctx.chief is not None and ctx.config.scaling.compile
    if announce:
        ctx.chief.progress.emit("compiling the UNet with torch.compile (inductor): the first step includes "
                                "the compilation and takes longer than the others")
    started = time.perf_counter()
    result = train_step(trainee, ctx.diffusion, batch.images, ctx.config, ctx.bf16, class_labels=batch.labels)
    if announce:
        ctx.chief.progress.emit(f"first step done in {time.perf_counter() - started:.1f} s (compilation included)")
    return result


def is_last_step(ctx: RunContext, step: int) -> bool:
    """Whether ``step`` ends the attempt: ``train.total_steps`` reached, or a log step at which the
    budget is spent (a collective then: ``TimeBudget.spent`` broadcasts rank 0's verdict)."""
    train = ctx.config.train
    if step >= train.total_steps:
        return True
    if step % train.log_every != 0 or not ctx.budget.spent(ctx.worker.world_size):
        return False
    if ctx.chief is not None:
        ctx.chief.progress.emit(f"time budget train.max_minutes={train.max_minutes:g} reached at step {step} "
                                f"({ctx.budget.seconds() / 60:.1f} min of training): ending the run here")
    return True


def log_window(ctx: RunContext, window: Window, step: int) -> dict[str, float]:
    """Reduce the window over the workers (a collective); rank 0 buffers the metrics of ``step``
    and prints its progress line. Returns the metrics (with ``lr``)."""
    metrics = {**window.reduce(ctx.worker.world_size), "lr": learning_rate(ctx.config.optimizer, step)}
    if ctx.chief is not None:
        ctx.chief.buffer.add(step, metrics)
        ctx.chief.progress.step(step, metrics["loss"], metrics["images_per_s"])
    return metrics


def checkpoint(ctx: RunContext, trainee: Trainee, metrics: dict[str, float], local_loss: float) -> None:
    """Report the checkpoint of ``trainee.step`` (a collective); rank 0 then prints where it went and
    logs the buffered metrics through that step to MLflow. Rank 0's report also carries the latest
    evaluation metrics (``val_bpd``, ``fd``: ``MetricBuffer.latest``), which a Ray Tune sweep's
    scheduler reads (``pipelines.tuning``)."""
    chief = ctx.chief
    reported = {**chief.buffer.latest(), **metrics} if chief is not None else metrics
    report_checkpoint(trainee, ctx.config, ctx.worker, chief.buffer if chief else None, ctx.run_id, reported,
                      local_loss, ctx.budget.seconds())
    if chief is not None:
        chief.progress.checkpoint(trainee.step, checkpoint_path(ctx.config, trainee.step))
        chief.flush_through(trainee.step)
