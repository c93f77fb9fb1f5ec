"""A worker's training objects (model, EMA, optimizer, timestep sampler, step) and how they are built,
fresh or from the checkpoint Ray Train hands over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import ray.train
import ray.train.torch
import torch

from diffusion_core.unet import UNet
from pipelines.training.config import OptimizerConfig, TrainConfig
from pipelines.training.ema import EMA
from pipelines.training.state import TrainState, load_train_state, restore_rng_state
from pipelines.training.timestep_sampler import LossSecondMomentSampler, build_timestep_sampler
from pipelines.training.worker import Worker, seed_from


@dataclass
class Trainee:
    """The mutable training objects of one worker."""

    model: torch.nn.Module  # possibly DDP-wrapped (and compiled)
    net: UNet  # the unwrapped UNet
    ema: EMA
    optimizer: torch.optim.Optimizer
    step: int  # optimizer steps done (the next step is step + 1)
    nonfinite_run: int = 0  # consecutive skipped (non-finite) steps up to the current one
    timestep_sampler: LossSecondMomentSampler | None = None  # None: uniform timesteps
    world_size: int = 1


def build_optimizer(params: Any, opt: OptimizerConfig) -> torch.optim.Optimizer:
    """Adam or AdamW (``optimizer.name``) with the configured betas, eps and weight decay (the
    learning rate is set per step by ``step.learning_rate``)."""
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)


def restore_state(worker: Worker) -> TrainState | None:
    """The training state of the checkpoint Ray Train hands over (``ray.train.get_checkpoint()``:
    after a worker failure, or when a run of the same name is re-submitted), or ``None`` on a fresh
    start."""
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
        torch.manual_seed(seed_from(config.train.seed, worker.rank, step))
    sampler = build_timestep_sampler(config.train.timestep_sampler, config.diffusion.num_timesteps)
    if sampler is not None and state is not None and state.timestep_sampler is not None:
        sampler.load_state_dict(state.timestep_sampler)
    return Trainee(model=model, net=net, ema=ema, optimizer=optimizer, step=step, timestep_sampler=sampler,
                   world_size=worker.world_size)
