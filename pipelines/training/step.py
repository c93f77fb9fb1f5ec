"""One optimizer step of a worker: per-example timesteps (uniform, importance-sampled or from
``diffusion.timestep_distribution``) and noise (``example_noise``), for a
class-conditional model the labels with label dropout, ``GaussianDiffusion.training_losses``,
backward (DDP averages the gradients), clip, Adam(W) with linear warm-up, EMA update; and the guard
that stops a run whose steps keep going non-finite."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.guidance import with_class_labels
from pipelines.training.config import OptimizerConfig, TrainConfig
from pipelines.training.example_noise import example_label_dropout, example_timesteps_and_noise
from pipelines.training.trainee import Trainee


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite losses or gradients for ``train.max_nonfinite_steps`` steps in
    a row, or non-finite weights; the message names the step. No checkpoint of it is written."""


def learning_rate(opt: OptimizerConfig, step: int) -> float:
    """Learning rate of 1-based ``step``: linear warm-up ``lr * min(1, step / warmup_steps)``
    (Ho et al. 2020, app. B), constant afterwards."""
    return opt.lr * min(1.0, step / opt.warmup_steps) if opt.warmup_steps > 0 else opt.lr


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
               bf16: bool, class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on this worker's part ``x_start`` [n, C, H, W] of the global batch.

    With ``class_labels`` (int64 [n] in [0, num_classes), a class-conditional model) each label is
    replaced by -1 with probability ``train.label_dropout`` (``example_noise.example_label_dropout``,
    drawn after and apart from the timesteps and noise) and the network is called
    ``model(x_t, t, labels)``; without them (an unconditional model) the step is the same
    computation, and draws the same random numbers, as it is for a model without classes.

    A step whose global gradient norm is not finite (a non-finite loss anywhere makes it so) is
    skipped on every rank: no optimizer or EMA update; the step still counts.

    Returns:
        ``(losses [n], t [n], grad_norm)``: per-example losses (float32, detached), 0-based
        timesteps (int64), and the global gradient L2 norm before clipping (non-finite for a
        skipped step).

    Raises:
        TrainingDivergedError: on the ``train.max_nonfinite_steps``-th skipped step in a row.
    """
    trainee.step += 1
    for group in trainee.optimizer.param_groups:
        group["lr"] = learning_rate(config.optimizer, trainee.step)
    sampler = trainee.timestep_sampler
    # p_t of the importance sampler, else of diffusion.timestep_distribution (None: uniform); the
    # config refuses the two together
    probabilities = sampler.probabilities() if sampler is not None else diffusion.timestep_probabilities
    t, noise = example_timesteps_and_noise(x_start, config.train.seed, trainee.step, diffusion.num_timesteps,
                                           probabilities)
    if x_start.device.type == "cuda" and config.scaling.channels_last:
        x_start = x_start.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(x_start.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    network = trainee.model
    if class_labels is not None:
        network = with_class_labels(trainee.model, example_label_dropout(
            x_start, class_labels, config.train.seed, trainee.step, config.train.label_dropout))
    trainee.optimizer.zero_grad(set_to_none=True)
    with autocast:
        losses = diffusion.training_losses(network, x_start, t, noise=noise)["loss"]
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
