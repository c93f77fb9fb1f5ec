"""The per-worker training loop that Ray Train runs on every worker (``train_func``).

Each worker builds the UNet with the same seed, restores the latest checkpoint when Ray Train
hands one over (``ray.train.get_checkpoint()``: after a worker failure or when a run of the same
name is re-submitted), wraps the model for DDP (``ray.train.torch.prepare_model``), and loops over
its shard of the training data (``ray.train.get_dataset_shard("train")``), epoch after epoch,
until ``train.total_steps`` optimizer steps are done. One step: per-example timesteps and noise
(``pipelines.training.example_noise``), ``GaussianDiffusion.training_losses``, backward (DDP averages the
gradients), clip, Adam(W) with linear warm-up, EMA update.

Rank 0 alone talks to MLflow (``pipelines.registry.runs``), draws sample grids and estimates held-out
bits/dim with the EMA weights, and writes the checkpoints handed to ``ray.train.report``. After a
restart the data epoch starts again from its beginning; the step count, weights, EMA, optimizer
and RNG states continue from the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from diffusion_core.checkpoint import save_checkpoint
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.unet import UNet
from pipelines.data.shards import read_split_numpy
from pipelines.evaluation.metrics import estimate_bpd, exact_bpd, sample_grid
from pipelines.registry.model_store import log_checkpoint_model
from pipelines.registry.runs import MetricBuffer, RunTracker, run_folder
from pipelines.training.config import OptimizerConfig, ScalingSection, TrainConfig
from pipelines.training.ema import EMA
from pipelines.training.example_noise import example_timesteps_and_noise
from pipelines.training.fd_monitor import TrainingFD
from pipelines.training.progress import ProgressLog
from pipelines.training.splits import training_split
from pipelines.training.state import (
    TrainState,
    capture_rng_state,
    load_train_state,
    restore_rng_state,
    save_train_state,
)
from pipelines.training.time_budget import TimeBudget
from pipelines.training.timestep_sampler import LossSecondMomentSampler, build_timestep_sampler

MODEL_URI_TAG = "ddpm.model_uri"  # the final model of the run (registered when a name is configured)
MODEL_STEP_TAG = "ddpm.model_step"  # the step it was logged at: finalization runs once per final step
RESUMED_FROM_TAG = "ddpm.resumed_from_step"  # the checkpoint step the latest (re)start of the worker group resumed from


@dataclass(frozen=True)
class Worker:
    """Who this worker is: its rank, the world size and its torch device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_chief(self) -> bool:
        """Rank 0: the one that logs and writes checkpoints."""
        return self.rank == 0


@dataclass
class Trainee:
    """The mutable training objects of one worker."""

    model: torch.nn.Module  # possibly DDP-wrapped
    net: UNet  # the unwrapped UNet
    ema: EMA
    optimizer: torch.optim.Optimizer
    step: int
    nonfinite_run: int = 0  # consecutive skipped (non-finite) steps up to the current one
    timestep_sampler: LossSecondMomentSampler | None = None  # None: uniform timesteps
    world_size: int = 1


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite losses or gradients for ``train.max_nonfinite_steps`` steps in
    a row, or non-finite weights; the message names the step. No checkpoint of it is written."""


def configure_torch(scaling: ScalingSection, device: torch.device) -> bool:
    """Threads on CPU (``torch.set_num_threads``: Ray sets OMP_NUM_THREADS to the reservation),
    TF32 matmuls on GPU. Returns whether bf16 autocast is on."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return scaling.precision in ("auto", "bf16")
    torch.set_num_threads(scaling.torch_threads or max(1, math.ceil(scaling.cpus_per_worker)))
    return scaling.precision == "bf16"


def learning_rate(opt: OptimizerConfig, step: int) -> float:
    """Learning rate of 1-based ``step``: linear warm-up ``lr * min(1, step / warmup_steps)``
    (Ho et al. 2020, app. B), constant afterwards."""
    return opt.lr * min(1.0, step / opt.warmup_steps) if opt.warmup_steps > 0 else opt.lr


def build_optimizer(params: Any, opt: OptimizerConfig) -> torch.optim.Optimizer:
    """Adam or AdamW with the configured betas, eps and weight decay (lr is set per step)."""
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)


def _seed_from(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def restore_state(worker: Worker) -> TrainState | None:
    """The training state of the checkpoint Ray Train hands over, or ``None`` on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_train_state(folder)


def prepare_ddp(net: torch.nn.Module) -> torch.nn.Module:
    """Ray Train's DDP wrapping (``ray.train.torch.prepare_model``) with gradients as views into the
    all-reduce buckets: no copy into and out of the buckets each step, one gradient-sized buffer
    less (clipping and Adam read the views in place)."""
    return ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"gradient_as_bucket_view": True})


def build_trainee(config: TrainConfig, worker: Worker, state: TrainState | None,
                  prepare: Callable[[torch.nn.Module], torch.nn.Module] = prepare_ddp) -> Trainee:
    """UNet (same seed on every rank), restored weights, wrapping by ``prepare`` (DDP inside a Ray
    Train worker; the identity for a single-process loop), ``torch.compile`` when
    ``scaling.compile``, EMA, optimizer, RNG. ``Trainee.net`` stays the plain UNet, so weights are
    saved without wrapper prefixes."""
    torch.manual_seed(config.train.seed)
    net = UNet(config.model)
    if state is not None:
        net.load_state_dict(state.raw_weights)
    if worker.device.type == "cuda" and config.scaling.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = prepare(net)
    if config.scaling.compile:  # after DDP, so DDP's bucketing sees the graph breaks it needs
        model = torch.compile(model)
    net = net.to(worker.device)
    ema = EMA(net, config.train.ema_decay, warmup=config.train.ema_warmup)
    optimizer = build_optimizer(model.parameters(), config.optimizer)
    step = 0
    if state is not None:
        ema.load_state_dict(state.ema_weights)
        optimizer.load_state_dict(state.optimizer)
        step = state.step
    if state is not None and len(state.rng_states) == worker.world_size:
        restore_rng_state(state.rng_states[worker.rank])
    else:  # dropout streams differ between ranks
        torch.manual_seed(_seed_from(config.train.seed, worker.rank, step))
    sampler = build_timestep_sampler(config.train.timestep_sampler, config.diffusion.num_timesteps)
    if sampler is not None and state is not None and state.timestep_sampler is not None:
        sampler.load_state_dict(state.timestep_sampler)
    return Trainee(model=model, net=net, ema=ema, optimizer=optimizer, step=step, timestep_sampler=sampler,
                   world_size=worker.world_size)


class Window:
    """Loss statistics over the steps since the last log point, reduced over all workers.

    Per-example losses are summed overall and by timestep quartile (q = floor(4 t / T)), so the
    logged ``loss`` is the mean over every image of every step of the window on every worker.
    """

    def __init__(self, num_timesteps: int, device: torch.device) -> None:
        self.num_timesteps = num_timesteps
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        # sums[5], counts[5], grad, steps, images, skipped steps
        self.stats = torch.zeros(14, dtype=torch.float64, device=self.device)
        self.started = time.perf_counter()

    def add(self, losses: torch.Tensor, t: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Add one step: per-example ``losses`` [N], timesteps ``t`` [N], the global grad norm. A
        skipped step (non-finite grad norm) counts its images and itself as skipped, no losses."""
        if not torch.isfinite(grad_norm):
            self.stats[12] += losses.numel()
            self.stats[13] += 1
            return
        losses = losses.detach().double()
        quartile = (t * 4) // self.num_timesteps
        self.stats[0] += losses.sum()
        self.stats[5] += losses.numel()
        self.stats[1:5].index_add_(0, quartile, losses)
        self.stats[6:10].index_add_(0, quartile, torch.ones_like(losses))
        self.stats[10] += grad_norm.detach().double()
        self.stats[11] += 1
        self.stats[12] += losses.numel()

    def reduce(self, world_size: int) -> dict[str, float]:
        """All-reduce (sum) over workers and return ``loss``, ``loss_q0..3``, ``grad_norm`` (over the
        steps not skipped), ``images_per_s`` (global images / wall seconds of the window) and
        ``skipped_steps`` (steps of the window skipped for a non-finite gradient); then reset."""
        stats = self.stats.clone()
        if world_size > 1:
            dist.all_reduce(stats)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        stats = stats.cpu().tolist()
        metrics = {"loss": stats[0] / max(stats[5], 1), "grad_norm": stats[10] / max(stats[11], 1),
                   "images_per_s": stats[12] / elapsed, "skipped_steps": stats[13] / max(world_size, 1)}
        for q in range(4):
            if stats[6 + q] > 0:
                metrics[f"loss_q{q}"] = stats[1 + q] / stats[6 + q]
        self.reset()
        return metrics


def gather_in_rank_order(t: torch.Tensor, losses: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's timesteps ``[n]`` and losses ``[n]`` concatenated in rank order (all ranks hold
    the same per-worker batch size ``n``), so that every rank updates its timestep sampler alike."""
    if world_size == 1:
        return t, losses
    gathered_t = [torch.empty_like(t) for _ in range(world_size)]
    gathered_losses = [torch.empty_like(losses) for _ in range(world_size)]
    dist.all_gather(gathered_t, t)
    dist.all_gather(gathered_losses, losses)
    return torch.cat(gathered_t), torch.cat(gathered_losses)


def train_step(trainee: Trainee, diffusion: GaussianDiffusion, x_start: torch.Tensor, config: TrainConfig,
               bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on this worker's part ``x_start`` [n, C, H, W] of the global batch.

    A step whose global gradient norm is not finite (a non-finite loss anywhere makes it so) is
    skipped on every rank: no optimizer or EMA update; the step still counts.

    Returns:
        ``(losses [n], t [n], grad_norm)``: per-example losses (float32, detached), timesteps, and
        the global gradient L2 norm before clipping (non-finite for a skipped step).

    Raises:
        TrainingDivergedError: on the ``train.max_nonfinite_steps``-th skipped step in a row.
    """
    trainee.step += 1
    for group in trainee.optimizer.param_groups:
        group["lr"] = learning_rate(config.optimizer, trainee.step)
    sampler = trainee.timestep_sampler
    probabilities = sampler.probabilities() if sampler is not None else None
    t, noise = example_timesteps_and_noise(x_start, config.train.seed, trainee.step, diffusion.num_timesteps,
                                           probabilities)
    if x_start.device.type == "cuda" and config.scaling.channels_last:
        x_start = x_start.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(x_start.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    trainee.optimizer.zero_grad(set_to_none=True)
    with autocast:
        losses = diffusion.training_losses(trainee.model, x_start, t, noise=noise)["loss"]
    if sampler is None:
        losses.float().mean().backward()
    else:  # importance weights 1 / (T p_t) keep the objective unbiased
        weights = torch.from_numpy(sampler.weights(t.cpu().numpy(), probabilities)).to(losses.device)
        (losses.float() * weights.float()).mean().backward()
    clip = config.optimizer.grad_clip if config.optimizer.grad_clip > 0 else float("inf")
    # The norm of the all-reduced gradients: the same on every rank, so all ranks skip together.
    grad_norm = torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), clip)
    if not torch.isfinite(grad_norm):
        trainee.optimizer.zero_grad(set_to_none=True)
        trainee.nonfinite_run += 1
        if trainee.nonfinite_run >= config.train.max_nonfinite_steps:
            raise TrainingDivergedError(
                f"training diverged at step {trainee.step}: {trainee.nonfinite_run} consecutive steps had a "
                f"non-finite loss or gradient (train.max_nonfinite_steps={config.train.max_nonfinite_steps}); "
                "the last checkpoint holds the last finite weights (lower optimizer.lr or raise optimizer.grad_clip)"
            )
        return losses.detach().float(), t, grad_norm
    trainee.nonfinite_run = 0
    trainee.optimizer.step()
    trainee.ema.update(trainee.net, trainee.step)
    if sampler is not None:
        all_t, all_losses = gather_in_rank_order(t, losses.detach().float(), trainee.world_size)
        sampler.update(all_t.cpu().numpy(), all_losses.cpu().numpy())
    return losses.detach().float(), t, grad_norm


def iterate_epochs(config: TrainConfig, worker: Worker) -> Iterator[torch.Tensor]:
    """Images ``[n, C, H, W]`` (float32, on the worker's device) of this worker's shard, epoch
    after epoch, ``n`` = per-worker batch size (incomplete batches dropped).

    Raises:
        RuntimeError: if an epoch yields no batch (the shard is smaller than one batch).
    """
    shard = ray.train.get_dataset_shard("train")
    buffer = config.data.local_shuffle_buffer or None
    epoch = 0
    while True:
        count = 0
        for batch in shard.iter_torch_batches(
            batch_size=config.per_worker_batch_size, drop_last=True, dtypes=torch.float32,
            device=worker.device, local_shuffle_buffer_size=buffer,
            local_shuffle_seed=_seed_from(config.train.seed, epoch, worker.rank) if buffer else None,
        ):
            count += 1
            yield batch["image"]
        if count == 0:
            raise RuntimeError(
                f"worker {worker.rank} got no full batch of {config.per_worker_batch_size} images in an epoch"
            )
        epoch += 1


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
    """Every rank's ``{"rank", "host", "pid", "weights_sha256", "local_loss"}`` (list indexed by rank).

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
                           "rank 0's; "
                           "the data-parallel replicas are out of sync")
    return replicas


def report_checkpoint(trainee: Trainee, config: TrainConfig, worker: Worker, buffer: MetricBuffer | None,
                      run_id: str, metrics: dict[str, float], local_loss: float, train_seconds: float = 0.0) -> None:
    """All ranks: report step ``trainee.step``; rank 0 attaches the checkpoint folder (written with
    ``save_train_state``, including its still-unlogged metrics and the replicas' summaries) to
    ``ray.train.report``.

    Raises:
        RuntimeError: if the replicas' weights differ (``gather_replicas``).
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


def checkpoint_dir_name(step: int) -> str:
    """The folder name of the checkpoint of ``step`` in the run folder: ``checkpoint_<step:08d>``."""
    return f"checkpoint_{step:08d}"


def checkpoint_path(config: TrainConfig, step: int) -> str:
    """Where Ray Train persists the checkpoint of ``step``: ``<storage_path>/<run_name>/checkpoint_<step>``."""
    return run_folder(config).join(checkpoint_dir_name(step)).uri


def ema_network(trainee: Trainee, config: TrainConfig, device: torch.device) -> UNet:
    """A fresh UNet in eval mode holding the EMA weights."""
    return trainee.ema.copy_to(UNet(config.model).to(device)).eval()


class ChiefDuties:
    """What rank 0 does besides training: metric buffering/flushing, sample grids, bits/dim."""

    def __init__(self, config: TrainConfig, tracker: RunTracker, diffusion: GaussianDiffusion,
                 val_images: torch.Tensor, pending: dict[int, dict[str, float]], start_step: int = 0) -> None:
        self.config = config
        self.tracker = tracker
        self.diffusion = diffusion
        self.val_images = val_images
        self.buffer = MetricBuffer()
        self.progress = ProgressLog(config.train.total_steps, start_step)
        tracker.resume_pending(pending)
        self.floor_logged = bool(config.train.fd_every) and tracker.has_metric_any("fd_floor")
        """Whether the run already holds ``fd_floor`` (logged once, also across restarts)."""

    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the model."""
        return self.config.model.image_shape

    def periodic(self, trainee: Trainee, device: torch.device) -> None:
        """Sample grid and/or bits/dim estimate when ``trainee.step`` is due."""
        train, step = self.config.train, trainee.step
        samples_due = train.sample_every and step % train.sample_every == 0
        bpd_due = train.bpd_every and step % train.bpd_every == 0 and len(self.val_images)
        if not (samples_due or bpd_due):
            return
        net = ema_network(trainee, self.config, device)
        if samples_due:
            self.log_samples(net, step)
        if bpd_due:
            subset = self.val_images[: train.bpd_images].to(device)
            result = estimate_bpd(self.diffusion, net, subset, train.bpd_samples, seed=train.seed)
            self.buffer.add(step, {"val_bpd": result["bpd"], "val_bpd_stderr": result["bpd_stderr"]})
            self.progress.val_bpd(step, result["bpd"], result["bpd_stderr"], len(subset), train.bpd_samples)

    def log_samples(self, net: UNet, step: int) -> None:
        """A grid of the EMA model drawn with ``train.sampler_settings`` as ``samples/step_<step>.png``
        (same seed every time)."""
        train = self.config.train
        _, png = sample_grid(self.diffusion, net, self.image_shape(), train.sample_images, train.sampler_settings,
                             train.seed)
        artifact = f"samples/step_{step:08d}.png"
        self.tracker.log_png(png, artifact)
        self.progress.samples(step, artifact, self.tracker.run_id)

    def finalize(self, trainee: Trainee, device: torch.device, manifest: dict[str, Any]) -> None:
        """At the end (once per final step, also across restarts; a run extended to more steps
        is finalized again): final grid, exact held-out bits/dim, and the EMA model logged and
        registered with the data manifest attached."""
        train, step = self.config.train, trainee.step
        if self.tracker.tag(MODEL_STEP_TAG) == str(step):
            return
        net = ema_network(trainee, self.config, device)
        self.log_samples(net, step)
        if train.final_bpd_images and len(self.val_images) and not self.tracker.has_metric("val_bpd_exact", step):
            subset = self.val_images[: train.final_bpd_images].to(device)
            result = exact_bpd(self.diffusion, net, subset, seed=train.seed)
            self.tracker.log_steps({step: {"val_bpd_exact": result["bpd"], "val_prior_bpd": result["prior_bpd"]}})
            self.progress.exact_bpd(step, result["bpd"], len(subset))
        with tempfile.TemporaryDirectory(prefix="ddpm-final-") as folder:
            save_checkpoint(folder, trainee.ema.state_dict(), self.config.model, self.config.diffusion,
                            metadata={"step": step, "weights": "ema", "mlflow_run_id": self.tracker.run_id,
                                      "run_name": train.run_name})
            ref = log_checkpoint_model(folder, registered_model_name=self.config.tracking.registered_model_name,
                                       manifest=manifest)
        self.tracker.set_tags({MODEL_URI_TAG: ref.model_uri, MODEL_STEP_TAG: str(step)})
        self.progress.model(step, ref.model_uri)


def measure_fd(fd: TrainingFD, trainee: Trainee, config: TrainConfig, diffusion: GaussianDiffusion,
               device: torch.device, chief: ChiefDuties | None) -> None:
    """The FD of the EMA model at ``trainee.step`` (a collective: every rank calls it); rank 0
    buffers ``fd`` (and ``fd_floor`` the first time in the run) and prints a line."""
    step = trainee.step
    with_floor = chief is not None and not chief.floor_logged
    result = fd.measure(ema_network(trainee, config, device), diffusion, device, with_floor)
    if chief is None or result is None:
        return
    if with_floor:
        chief.floor_logged = True
    chief.buffer.add(step, result)
    chief.progress.fd(step, result["fd"], result.get("fd_floor"), config.train.fd_images)


def current_worker() -> Worker:
    """This worker's rank, world size and device, from the Ray Train context."""
    context = ray.train.get_context()
    return Worker(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``.

    Args:
        loop_config: ``{"config": TrainConfig.to_dict(), "mlflow_run_id": str,
            "tracking_uri": str, "manifest": dict}`` built by ``pipelines/train.py``.
    """
    config = TrainConfig.from_dict(loop_config["config"])
    worker = current_worker()
    bf16 = configure_torch(config.scaling, worker.device)
    state = restore_state(worker)
    trainee = build_trainee(config, worker, state)
    diffusion = GaussianDiffusion(config.diffusion)
    fd = TrainingFD(config, worker.rank, worker.world_size) if config.train.fd_every else None
    budget = TimeBudget(config.train.max_minutes, state.train_seconds if state else 0.0)
    if not worker.is_chief:
        run_loop(config, worker, trainee, diffusion, bf16, None, loop_config["mlflow_run_id"], fd, budget)
        return
    tracker = RunTracker(loop_config["tracking_uri"], loop_config["mlflow_run_id"], config.tracking.log_system_metrics)
    with tracker:
        if state is not None:
            tracker.set_tags({RESUMED_FROM_TAG: str(state.step)})
        val_images = load_val_images(config)
        chief = ChiefDuties(config, tracker, diffusion, val_images, state.pending_metrics if state else {},
                            start_step=state.step if state else 0)
        run_loop(config, worker, trainee, diffusion, bf16, chief, tracker.run_id, fd, budget)
        chief.finalize(trainee, worker.device, loop_config["manifest"])


def load_val_images(config: TrainConfig) -> torch.Tensor:
    """The fixed validation subset for bits/dim (first images of the val split), [N, C, H, W]."""
    count = max(config.train.bpd_images if config.train.bpd_every else 0, config.train.final_bpd_images)
    if count == 0:
        return torch.empty(0)
    images, _ = read_split_numpy(config.data.shards, training_split("val"), limit=count)
    return torch.from_numpy(images)


def run_loop(config: TrainConfig, worker: Worker, trainee: Trainee, diffusion: GaussianDiffusion, bf16: bool,
             chief: ChiefDuties | None, run_id: str, fd: TrainingFD | None = None,
             budget: TimeBudget | None = None) -> None:
    """Train until ``train.total_steps``, or until the wall-time ``budget`` (``train.max_minutes``)
    is spent at a log step: step, log windows, periodic evaluation (rank 0; the FD on every rank),
    checkpoints."""
    train = config.train
    budget = budget or TimeBudget(0.0)
    budget.start()
    if trainee.step >= train.total_steps or budget.spent(worker.world_size):
        return
    if chief is not None:
        chief.progress.budget_ends_at = budget.ends_at()
    trainee.model.train()
    window = Window(diffusion.num_timesteps, worker.device)
    last_metrics: dict[str, float] = {}
    first_step = True
    for x_start in iterate_epochs(config, worker):
        if first_step and chief is not None and config.scaling.compile:
            chief.progress.emit("compiling the UNet with torch.compile (inductor): the first step includes "
                                "the compilation and takes longer than the others")
        started = time.perf_counter()
        losses, t, grad_norm = train_step(trainee, diffusion, x_start, config, bf16)
        if first_step and chief is not None and config.scaling.compile:
            chief.progress.emit(f"first step done in {time.perf_counter() - started:.1f} s (compilation included)")
        first_step = False
        window.add(losses, t, grad_norm)
        step = trainee.step
        out_of_time = step < train.total_steps and step % train.log_every == 0 and budget.spent(worker.world_size)
        done = step >= train.total_steps or out_of_time
        if out_of_time and chief is not None:
            chief.progress.emit(f"time budget train.max_minutes={train.max_minutes:g} reached at step {step} "
                                f"({budget.seconds() / 60:.1f} min of training): ending the run here")
        if step % train.log_every == 0 or done:
            last_metrics = {**window.reduce(worker.world_size), "lr": learning_rate(config.optimizer, step)}
            if chief is not None:
                chief.buffer.add(step, last_metrics)
                chief.progress.step(step, last_metrics["loss"], last_metrics["images_per_s"])
        if chief is not None:
            chief.periodic(trainee, worker.device)
        if fd is not None and fd.due(step):
            measure_fd(fd, trainee, config, diffusion, worker.device, chief)
        if step % train.checkpoint_every == 0 or done:
            report_checkpoint(trainee, config, worker, chief.buffer if chief else None, run_id, last_metrics,
                              float(losses.mean()), budget.seconds())
            if chief is not None:
                chief.progress.checkpoint(step, checkpoint_path(config, step))
            if chief is not None:
                chief.tracker.log_steps(chief.buffer.take_through(step))
        if done:
            return
