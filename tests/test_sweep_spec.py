"""The sweep YAML (pipelines/tuning/spec.py): parsing, errors that name the key, the checks against the
base training config, the Tune search space and a trial's overrides, the default trial concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from _train_helpers import REPO_ROOT, TINY_CONFIG
from ray import tune

from pipelines.training.config import load_config
from pipelines.tuning.concurrency import default_concurrency, trial_resources
from pipelines.tuning.space import VARIANT_KEY, param_space, trial_overrides
from pipelines.tuning.spec import Domain, load_sweep, spec_from_dict

BASE = load_config(TINY_CONFIG)
MINIMAL = {"metric": "loss", "search_space": {"optimizer.lr": {"loguniform": [1.0e-4, 1.0e-2]}}}


def spec(**changes: Any):
    return spec_from_dict({**MINIMAL, **changes})


def test_the_project_sweeps_load_and_fit_their_configs() -> None:
    bpd = load_sweep(REPO_ROOT / "configs" / "sweeps" / "bpd_configs.yaml")
    bpd.check_against(load_config(REPO_ROOT / "configs" / "fashion_mnist.yaml"))
    assert (bpd.metric, bpd.scheduler.name, list(bpd.variants)) == ("val_bpd", "fifo", ["simple", "hybrid", "vlb_is"])
    assert bpd.search_space["diffusion.schedule"] == Domain("grid_search", ("linear", "cosine"))
    tiny = load_sweep(REPO_ROOT / "configs" / "sweeps" / "tiny_lr.yaml")
    tiny.check_against(BASE)
    assert tiny.scheduler.name == "asha" and tiny.trial_max_t(BASE) == 200


@pytest.mark.parametrize("raw, message", [
    ({**MINIMAL, "metrics": "loss"}, r"unknown sweep key\(s\) \['metrics'\]"),
    ({"search_space": MINIMAL["search_space"]}, "metric is required"),
    ({**MINIMAL, "metric": "accuracy"}, "metric='accuracy' must be one of"),
    ({**MINIMAL, "mode": "lowest"}, "mode='lowest' must be one of"),
    ({**MINIMAL, "num_samples": 0}, "num_samples=0 must be an integer >= 1"),
    ({**MINIMAL, "scheduler": {"name": "asha", "grace": 1}}, r"unknown scheduler key\(s\) \['grace'\]"),
    ({**MINIMAL, "scheduler": {"name": "pbt"}}, "scheduler.name='pbt' must be one of"),
    ({**MINIMAL, "scheduler": {"name": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor=1"),
    ({**MINIMAL, "scheduler": {"time_attr": "epoch"}}, "scheduler.time_attr='epoch'"),
    ({**MINIMAL, "budget": {"train.log_every": 5}}, "budget key='train.log_every' must be one of"),
    ({**MINIMAL, "max_concurrent_trials": 0}, "max_concurrent_trials=0"),
    ({"metric": "loss"}, "needs a search_space or variants"),
    ({"metric": "loss", "search_space": {"lr": {"choice": [1]}}}, "search_space: key 'lr' must look like section.key"),
    ({"metric": "loss", "search_space": {"train.run_name": {"choice": ["a"]}}}, "'train.run_name' is set by the sweep"),
    ({"metric": "loss", "search_space": {"optimizer.lr": [1, 2]}}, r"search_space.optimizer.lr=\[1, 2\] must be one"),
    ({"metric": "loss", "search_space": {"optimizer.lr": {"normal": [0, 1]}}}, "search_space.optimizer.lr kind='normal'"),
    ({"metric": "loss", "search_space": {"optimizer.lr": {"uniform": [0.1, 0.01]}}}, "low < high"),
    ({"metric": "loss", "search_space": {"optimizer.lr": {"loguniform": [0, 0.01]}}}, "loguniform needs low > 0"),
    ({"metric": "loss", "search_space": {"train.seed": {"randint": [0, 2.5]}}}, "randint needs integer"),
    ({"metric": "loss", "search_space": {"train.seed": {"grid_search": []}}}, "needs a non-empty list"),
    ({"metric": "loss", "variants": {"a": ["optimizer.lr"]}}, "variants.a must be a mapping"),
])
def test_malformed_sweeps_are_refused_naming_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec_from_dict(raw)


@pytest.mark.parametrize("changes, message", [
    ({"search_space": {"optimizer.lr": {"grid_search": [1.0e-3, 2.0]}}},
     r"search_space.optimizer.lr: value 2.0 is refused: optimizer.lr=2.0"),
    ({"search_space": {"optimizer.lrate": {"choice": [1.0e-3]}}}, "search_space.optimizer.lrate: value 0.001 is refused"),
    ({"search_space": {"train.seed": {"randint": [-1, 3]}}}, "search_space.train.seed: value -1 is refused"),
    ({"search_space": {"optimizer.lr": {"uniform": [1.0e-3, 1.5]}}}, "value 1.5 is refused"),
    ({"variants": {"broken": {"diffusion.variance": "learned_range"}}}, "variants.broken: "),
    ({"budget": {"train.total_steps": 0}}, "budget: train.total_steps=0"),
    ({"metric": "val_bpd", "search_space": {"train.bpd_every": {"choice": [0]}}, "budget": {}},
     None),  # checked below with a base that never measures it
])
def test_values_no_trial_could_run_with_are_refused(changes: dict[str, Any], message: str | None) -> None:
    sweep = spec(**changes)
    if message is None:
        with pytest.raises(ValueError, match="metric='val_bpd' is never measured: train.bpd_every is 0"):
            sweep.check_against(BASE.replace({"train.bpd_every": 0}))
        return
    with pytest.raises(ValueError, match=message):
        sweep.check_against(BASE)


def test_a_value_valid_with_one_variant_is_left_to_its_trials() -> None:
    # out_channels=2 is valid only with learned_range: refused alone, accepted beside a variant that has it
    learned = {"diffusion.variance": "learned_range", "model.out_channels": 2}
    space = {"diffusion.loss": {"grid_search": ["hybrid", "vlb"]}}
    spec(search_space=space, variants={"plain": {}, "learned": learned}).check_against(BASE)
    with pytest.raises(ValueError, match="search_space.model.out_channels: value 2 is refused"):
        spec(search_space={"model.out_channels": {"choice": [2]}}).check_against(BASE)


def test_param_space_and_trial_overrides() -> None:
    sweep = spec(search_space={"optimizer.lr": {"loguniform": [1.0e-4, 1.0e-2]},
                               "train.seed": {"randint": [0, 3]},
                               "diffusion.schedule": {"grid_search": ["linear", "cosine"]},
                               "optimizer.name": {"choice": ["adam", "adamw"]}},
                 variants={"a": {"optimizer.warmup_steps": 7}, "b": {}},
                 budget={"train.total_steps": 50, "train.max_minutes": 1.5})
    space = param_space(sweep)
    assert isinstance(space["optimizer.lr"], tune.search.sample.Float)
    assert isinstance(space["train.seed"], tune.search.sample.Integer)
    assert space["diffusion.schedule"] == {"grid_search": ["linear", "cosine"]}
    assert space[VARIANT_KEY] == {"grid_search": ["a", "b"]}
    sampled = {"optimizer.lr": 3e-3, "train.seed": 2, "diffusion.schedule": "cosine", "optimizer.name": "adamw",
               VARIANT_KEY: "a"}
    overrides = trial_overrides(sweep, sampled)
    assert overrides == {"train.total_steps": 50, "train.max_minutes": 1.5, "optimizer.warmup_steps": 7,
                         "optimizer.lr": 3e-3, "train.seed": 2, "diffusion.schedule": "cosine",
                         "optimizer.name": "adamw"}
    assert BASE.replace(overrides).train.total_steps == 50
    params = sweep.params()
    assert params["sweep.search_space.optimizer.lr"] == "loguniform(0.0001, 0.01)"
    assert params["sweep.variants"] == "a, b" and params["sweep.budget.train.total_steps"] == "50"


def test_default_concurrency_fits_the_cluster() -> None:
    # tiny_cpu: 1 worker x 1 CPU + 1 CPU for Ray Data per trial
    assert trial_resources(BASE) == {"CPU": 2.0, "GPU": 0.0}
    assert default_concurrency(BASE, {"CPU": 2.0}) == 1
    assert default_concurrency(BASE, {"CPU": 7.0}) == 3
    assert default_concurrency(BASE, {"CPU": 1.0}) == 1  # a cluster that may grow: one at a time
    gpu = BASE.replace({"scaling.use_gpu": True, "scaling.num_workers": 2, "scaling.cpus_per_worker": 4})
    assert trial_resources(gpu) == {"CPU": 9.0, "GPU": 2.0}
    assert default_concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    assert default_concurrency(gpu, {"CPU": 18.0, "GPU": 8.0}) == 2


def test_load_sweep_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("metric: [loss\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_sweep(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(MINIMAL))
    assert load_sweep(good).search_space["optimizer.lr"] == Domain("loguniform", (1.0e-4, 1.0e-2))
