"""Save and restore the full training state in one checkpoint folder.

Layout of a training checkpoint (what rank 0 hands to ``ray.train.report``)::

    model.safetensors, config.json   EMA weights as a core checkpoint (diffusion_core.checkpoint):
                                     loadable by serving and evaluate.py as it is
    raw_model.safetensors            the raw (non-averaged) weights being optimized
    optimizer.pt                     optimizer state, every rank's RNG states and the timestep
                                     sampler's loss history (torch.save of
                                     tensors and plain Python values only; read with weights_only)
    train_state.json                 step, MLflow run id, world size, every replica's summary (rank,
                                     host, pid, sha256 of its weights, its local loss of the step),
                                     and the step metrics not yet confirmed in MLflow (see
                                     pipelines/registry/runs.py)
    train_config.yaml                the resolved training config
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffusion_core.checkpoint import WEIGHTS_NAME, save_checkpoint
from pipelines.training.config import TrainConfig

RAW_WEIGHTS = "raw_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
CONFIG_FILE = "train_config.yaml"


@dataclass(frozen=True)
class TrainState:
    """Everything needed to continue training exactly where a checkpoint left off.

    Attributes:
        step: optimizer steps done (1-based count; 0 before the first step).
        raw_weights: the optimized model's ``state_dict`` (CPU tensors).
        ema_weights: the EMA shadow weights (CPU tensors).
        optimizer: the optimizer's ``state_dict``.
        rng_states: per rank, ``{"cpu": ByteTensor, "cuda": ByteTensor | None}``.
        mlflow_run_id: the run that tracks this training.
        pending_metrics: ``{step: {name: value}}`` logged to MLflow only once this checkpoint is
            reported (keys are ints; each entry's ``tracking.TIME_KEY`` is its measurement time).
        replicas: every rank's summary at this step (``checkpointing.gather_replicas``).
        timestep_sampler: the importance sampler's state (``None``: uniform timesteps).
        train_seconds: training wall-clock seconds up to this step, over all attempts of the run
            (``training.time_budget``; rank 0's clock).
    """

    step: int
    raw_weights: dict[str, torch.Tensor]
    ema_weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng_states: list[dict[str, Any]]
    mlflow_run_id: str | None
    pending_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    replicas: list[dict[str, Any]] = field(default_factory=list)
    timestep_sampler: dict[str, Any] | None = None
    train_seconds: float = 0.0


def capture_rng_state() -> dict[str, Any]:
    """This process's torch RNG states: CPU, and the current CUDA device's when CUDA is in use."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_train_state(directory: str | Path, state: TrainState, config: TrainConfig) -> Path:
    """Write ``state`` and ``config`` into ``directory`` (layout in the module docstring).

    Returns:
        The absolute folder.

    Raises:
        ValueError: if the weights do not match ``config.model`` (from ``save_checkpoint``).
    """
    folder = save_checkpoint(
        directory,
        state.ema_weights,
        config.model,
        config.diffusion,
        metadata={"step": state.step, "weights": "ema", "ema_decay": config.train.ema_decay, "ema_warmup": config.train.ema_warmup,
                  "mlflow_run_id": state.mlflow_run_id, "run_name": config.train.run_name},
    )
    save_file({k: v.detach().cpu().contiguous() for k, v in state.raw_weights.items()}, str(folder / RAW_WEIGHTS))
    torch.save({"optimizer": state.optimizer, "rng_states": state.rng_states,
                "timestep_sampler": state.timestep_sampler}, folder / OPTIMIZER_FILE)
    summary = {
        "step": state.step,
        "mlflow_run_id": state.mlflow_run_id,
        "world_size": len(state.rng_states),
        "replicas": state.replicas,
        "train_seconds": state.train_seconds,
        "pending_metrics": {str(step): values for step, values in sorted(state.pending_metrics.items())},
    }
    (folder / STATE_FILE).write_text(json.dumps(summary, indent=2))
    (folder / CONFIG_FILE).write_text(config.to_yaml())
    return folder


def load_train_state(directory: str | Path, device: str | torch.device = "cpu") -> TrainState:
    """Read a folder written by ``save_train_state``; tensors are loaded onto ``device``.

    Raises:
        FileNotFoundError: if one of the files is missing (the message names it).
    """
    folder = Path(directory)
    for name in (WEIGHTS_NAME, RAW_WEIGHTS, OPTIMIZER_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"training checkpoint {folder.resolve()} has no {name}")
    summary = json.loads((folder / STATE_FILE).read_text())
    extra = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return TrainState(
        step=int(summary["step"]),
        raw_weights=load_file(str(folder / RAW_WEIGHTS), device=str(device)),
        ema_weights=load_file(str(folder / WEIGHTS_NAME), device=str(device)),
        optimizer=extra["optimizer"],
        rng_states=extra["rng_states"],
        mlflow_run_id=summary.get("mlflow_run_id"),
        pending_metrics={int(step): values for step, values in summary.get("pending_metrics", {}).items()},
        replicas=list(summary.get("replicas", [])),
        timestep_sampler=extra.get("timestep_sampler"),
        train_seconds=float(summary.get("train_seconds", 0.0)),
    )
