"""How many trials of a sweep run at once by default: as many as the cluster's resources fit."""

from __future__ import annotations

import math
from typing import Mapping

from pipelines.training.config import TrainConfig


def trial_resources(config: TrainConfig) -> dict[str, float]:
    """What one trial (one training run) occupies: ``scaling.num_workers`` x ``cpus_per_worker``
    CPUs plus 1 CPU for Ray Data's ingest (as ``training.launcher.check_resources`` asks), and one
    GPU per worker with ``scaling.use_gpu``. The trial's own driver function reserves nothing."""
    scaling = config.scaling
    return {"CPU": scaling.num_workers * scaling.cpus_per_worker + 1.0,
            "GPU": float(scaling.num_workers) if scaling.use_gpu else 0.0}


def default_concurrency(config: TrainConfig, cluster: Mapping[str, float]) -> int:
    """``min`` over CPU (and GPU) of ``floor(cluster / per trial)``, at least 1 (a cluster that can
    grow runs one trial while it does).

    Args:
        config: the base training config (its ``scaling``).
        cluster: ``ray.cluster_resources()``.
    """
    fits = [math.floor(float(cluster.get(name, 0.0)) / need + 1e-9)
            for name, need in trial_resources(config).items() if need > 0]
    return max(1, min(fits))
