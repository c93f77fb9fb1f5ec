"""A sweep's trial: the training run of ``pipelines/train.py`` inside a Ray Tune trial.

This is the pattern Ray documents for Ray Train V2 under Tune ("Hyperparameter Tuning with Ray
Tune" in the Ray Train user guide): a function trainable (``train_driver_fn``) builds the
``TorchTrainer`` and calls ``fit()``, with ``ray.tune.integration.ray_train.TuneReportCallback`` among
the trainer's callbacks, so that what the workers report (``ray.train.report`` at each checkpoint:
``step``, ``loss``, the latest ``val_bpd`` / ``fd``, ...) reaches Tune and its scheduler. The trial
calls ``training.launcher.run`` itself, so it has the same checks, checkpoints, progress lines,
MLflow logging and divergence guard as a ``train.py`` run; it runs on the cluster the sweep's driver
connected to (``launcher.connect_cluster`` starts nothing inside a Ray worker).

Each trial is named ``<sweep>-<trial id>`` (its Ray Train run folder and MLflow run name): a trial that
Tune restarts after ``--resume`` resumes that run from its latest checkpoint and logs into the
same MLflow child run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.training.config import TrainConfig
from pipelines.training.launcher import run
from pipelines.tuning.space import VARIANT_KEY, trial_overrides
from pipelines.tuning.spec import SweepSpec
from pipelines.tuning.tracking import child_tags


@dataclass(frozen=True)
class TrialContext:
    """What every trial shares (passed with ``tune.with_parameters``).

    Attributes:
        base: the resolved base config (``TrainConfig.to_dict()``; absolute ``data.shards`` and
            ``train.storage_path``).
        spec: the sweep.
        sweep_name: the sweep's name (prefix of the trials' run names).
        parent_run_id: the sweep's MLflow parent run.
        tracking_uri: MLflow's URI (the driver's, whatever the trial process's environment).
    """

    base: Mapping[str, Any]
    spec: SweepSpec
    sweep_name: str
    parent_run_id: str
    tracking_uri: str


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """``<sweep>-<trial id>``: the trial's Ray Train run folder and MLflow run name."""
    return f"{sweep_name}-{trial_id}"


def trial_config(context: TrialContext, sampled: Mapping[str, Any], trial_id: str) -> TrainConfig:
    """The trial's training config: the base with the budget, variant and sampled values, named
    ``trial_run_name``, its model logged without registering (``--register-best`` registers the best).

    Raises:
        ValueError: when the combination is not a valid training config (the trial fails alone).
    """
    overrides = {**trial_overrides(context.spec, sampled), "train.run_name": trial_run_name(context.sweep_name, trial_id),
                 "tracking.registered_model_name": None}
    return TrainConfig.from_dict(context.base).replace(overrides)


def train_driver_fn(sampled: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: build the trial's config and run it as ``train.py`` would, with
    ``TuneReportCallback`` passing the workers' reports to Tune.

    Raises:
        ValueError: an invalid combination; whatever ``launcher.run`` raises (divergence, failures
            beyond ``scaling.max_failures``). Tune records the trial as errored and goes on.
    """
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(context, sampled, trial_id)
    tags = child_tags(context.sweep_name, trial_id, sampled.get(VARIANT_KEY))
    run(config, parent_run_id=context.parent_run_id, tags=tags, callbacks=[TuneReportCallback()],
        tracking_uri=context.tracking_uri)
