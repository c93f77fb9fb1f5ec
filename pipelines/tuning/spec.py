"""The sweep YAML (``configs/sweeps/*.yaml``) as a frozen, validated ``SweepSpec``.

A sweep names the metric to optimize, a search space over training config keys (``section.key``),
optional named ``variants`` (bundles of overrides, searched as a grid), a per-trial ``budget`` and a
scheduler. ``load_sweep`` refuses unknown keys and malformed values; ``check_against`` then resolves
the base training config with every value the search can produce (each grid or choice value, both
bounds of a range), so that a value no trial could run with is refused before any trial starts,
naming its key. Combinations are not enumerated: a trial whose combination is invalid fails alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

import yaml

from pipelines.training.config import TrainConfig

DomainKind = Literal["grid_search", "choice", "uniform", "loguniform", "randint"]
SchedulerName = Literal["asha", "fifo"]
Mode = Literal["min", "max"]
TOP_KEYS = ("name", "metric", "mode", "num_samples", "scheduler", "budget", "max_concurrent_trials", "variants",
            "search_space")
SCHEDULER_KEYS = ("name", "time_attr", "grace_period", "reduction_factor", "max_t")
BUDGET_KEYS = ("train.max_minutes", "train.total_steps")
#: Keys the sweep itself sets per trial (run name and storage) or keeps from the base config (data,
#: MLflow experiment and registration): not searchable.
RESERVED_KEYS = ("train.run_name", "train.storage_path", "data.shards", "tracking.experiment_name",
                 "tracking.registered_model_name")
#: What a training run reports to Ray Train at each checkpoint (``training.loop.checkpoint``), so what
#: a sweep may optimize or schedule on; ``val_bpd``/``val_bpd_stderr`` need ``train.bpd_every`` > 0,
#: ``fd``/``fd_floor`` need ``train.fd_every`` > 0.
REPORTED_METRICS = ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm", "images_per_s", "skipped_steps",
                    "lr", "step", "val_bpd", "val_bpd_stderr", "fd", "fd_floor")
TIME_ATTRS = ("step", "training_iteration", "time_total_s")


@dataclass(frozen=True)
class Domain:
    """One searched key's distribution.

    Attributes:
        kind: ``grid_search`` / ``choice`` (``values`` listed), ``uniform`` / ``loguniform`` (``values``
            = ``(low, high)``, floats, ``0 < low`` for loguniform) or ``randint`` (``(low, high)``,
            ints, ``high`` excluded, as ``ray.tune.randint``).
        values: as above.
    """

    kind: DomainKind
    values: tuple[Any, ...]

    def candidates(self) -> tuple[Any, ...]:
        """The values checked against the training config: every listed value, or a range's ends
        (``randint``: ``low`` and ``high - 1``)."""
        if self.kind == "randint":
            return (self.values[0], self.values[1] - 1)
        return self.values

    def describe(self) -> str:
        """``kind(values)`` as shown in the sweep's MLflow params."""
        return f"{self.kind}({', '.join(repr(v) for v in self.values)})"


@dataclass(frozen=True)
class SchedulerSpec:
    """The trial scheduler: ``asha`` (``ray.tune.schedulers.ASHAScheduler``: a trial is stopped at a
    rung ``grace_period * reduction_factor**k`` of ``time_attr`` when its metric is outside the top
    ``1/reduction_factor`` of the trials that reached that rung; Li et al. 2020) or ``fifo`` (every
    trial runs its whole budget).

    Attributes:
        name: "asha" or "fifo".
        time_attr: the reported counter of the rungs: ``step`` (optimizer steps), ``training_iteration``
            (reports, one per checkpoint) or ``time_total_s``.
        grace_period: the first rung, >= 1.
        reduction_factor: > 1.
        max_t: the last rung; ``None``: the trials' ``train.total_steps`` when ``time_attr`` is ``step``.
    """

    name: SchedulerName = "fifo"
    time_attr: str = "step"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None

    def __post_init__(self) -> None:
        _check_in("scheduler.name", self.name, get_args(SchedulerName))
        _check_in("scheduler.time_attr", self.time_attr, TIME_ATTRS)
        _check_int("scheduler.grace_period", self.grace_period, 1)
        if not _is_number(self.reduction_factor) or self.reduction_factor <= 1:
            raise ValueError(f"scheduler.reduction_factor={self.reduction_factor!r} must be a number > 1")
        if self.max_t is not None:
            _check_int("scheduler.max_t", self.max_t, self.grace_period)


@dataclass(frozen=True)
class SweepSpec:
    """A sweep of training runs.

    Attributes:
        name: the sweep's name (its Tune folder ``<train.storage_path>/sweeps/<name>`` and MLflow run
            name); ``None``: the entry point derives ``<file stem>-<timestamp>``.
        metric: a metric the training reports (``REPORTED_METRICS``), e.g. ``val_bpd`` or ``loss``.
        mode: "min" or "max".
        num_samples: times the search space is sampled (a grid is repeated that many times), >= 1.
        scheduler: ``SchedulerSpec``.
        budget: per-trial overrides of ``train.max_minutes`` and/or ``train.total_steps``.
        max_concurrent_trials: trials at once, >= 1; ``None``: as many as the cluster fits
            (``concurrency.default_concurrency``).
        variants: ``{name: {"section.key": value}}``, searched as a grid (the ``variant`` of each trial);
            empty: none.
        search_space: ``{"section.key": Domain}``.
    """

    metric: str
    mode: Mode = "min"
    name: str | None = None
    num_samples: int = 1
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    budget: Mapping[str, Any] = field(default_factory=dict)
    max_concurrent_trials: int | None = None
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    search_space: Mapping[str, Domain] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_in("metric", self.metric, REPORTED_METRICS)
        _check_in("mode", self.mode, get_args(Mode))
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip() or "/" in self.name):
            raise ValueError(f"name={self.name!r} must be a plain folder name (no '/')")
        _check_int("num_samples", self.num_samples, 1)
        if self.max_concurrent_trials is not None:
            _check_int("max_concurrent_trials", self.max_concurrent_trials, 1)
        for key in self.budget:
            _check_in("budget key", key, BUDGET_KEYS)
        for name, overrides in self.variants.items():
            if not isinstance(overrides, Mapping):
                raise ValueError(f"variants.{name} must be a mapping of section.key: value, got {overrides!r}")
            for key in overrides:
                _check_key(f"variants.{name}", key)
        for key in self.search_space:
            _check_key("search_space", key)
        if not (self.search_space or self.variants):
            raise ValueError("a sweep needs a search_space or variants (nothing to search)")

    def params(self) -> dict[str, str]:
        """The spec as flat MLflow params of the sweep's parent run (``sweep.*``)."""
        out = {"sweep.metric": self.metric, "sweep.mode": self.mode, "sweep.num_samples": str(self.num_samples),
               "sweep.max_concurrent_trials": str(self.max_concurrent_trials),
               **{f"sweep.scheduler.{k}": str(getattr(self.scheduler, k)) for k in SCHEDULER_KEYS},
               **{f"sweep.budget.{k}": str(v) for k, v in self.budget.items()},
               **{f"sweep.search_space.{k}": d.describe() for k, d in self.search_space.items()}}
        if self.variants:
            out["sweep.variants"] = ", ".join(self.variants)
        return out

    def check_against(self, base: TrainConfig) -> None:
        """Resolve ``base`` with the budget, each variant, and each search value (``Domain.candidates``).

        A variant must resolve with the base and budget; a search value must resolve with at least
        one variant (or the base alone), so that only combinations can fail, and then as single trials.

        Raises:
            ValueError: naming the variant or ``search_space.<key>`` and the value, with the config's
                own message; or ``metric`` when the base config does not measure it.
        """
        budgeted = _resolve(base, dict(self.budget), "budget")
        variants = [_resolve(budgeted, dict(o), f"variants.{n}") for n, o in self.variants.items()] or [budgeted]
        for key, domain in self.search_space.items():
            for value in domain.candidates():
                errors = []
                for variant in variants:
                    try:
                        variant.replace({key: value})
                    except ValueError as err:
                        errors.append(err)
                if len(errors) == len(variants):
                    raise ValueError(f"search_space.{key}: value {value!r} is refused: {errors[0]}")
        cadence = {"val_bpd": "train.bpd_every", "val_bpd_stderr": "train.bpd_every", "fd": "train.fd_every",
                   "fd_floor": "train.fd_every"}.get(self.metric)
        if cadence and not any(getattr(v.train, cadence.split(".")[1]) for v in variants):
            raise ValueError(f"metric={self.metric!r} is never measured: {cadence} is 0 in the base config")

    def trial_max_t(self, base: TrainConfig) -> int:
        """ASHA's last rung: ``scheduler.max_t``, else the trials' ``train.total_steps`` (budget or base)."""
        if self.scheduler.max_t is not None:
            return self.scheduler.max_t
        return int(self.budget.get("train.total_steps", base.train.total_steps))


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: an unknown key (naming it and the known ones), or a bad value (naming its key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path.resolve()} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"sweep file {path.resolve()} is not valid YAML: {err}") from err
    return spec_from_dict(raw)


def spec_from_dict(raw: Any) -> SweepSpec:
    """``SweepSpec`` from the parsed YAML mapping (see ``load_sweep``)."""
    if not isinstance(raw, Mapping):
        raise ValueError("a sweep file must hold a mapping (metric, search_space, ...)")
    _check_known("sweep key", raw, TOP_KEYS)
    if "metric" not in raw:
        raise ValueError("metric is required (e.g. metric: val_bpd)")
    scheduler = raw.get("scheduler") or {}
    if not isinstance(scheduler, Mapping):
        raise ValueError(f"scheduler must be a mapping, got {scheduler!r}")
    _check_known("scheduler key", scheduler, SCHEDULER_KEYS)
    space = raw.get("search_space") or {}
    if not isinstance(space, Mapping):
        raise ValueError(f"search_space must be a mapping of section.key: {{kind: values}}, got {space!r}")
    for name in ("budget", "variants"):
        if not isinstance(raw.get(name) or {}, Mapping):
            raise ValueError(f"{name} must be a mapping, got {raw[name]!r}")
    return SweepSpec(
        metric=raw["metric"], mode=raw.get("mode", "min"), name=raw.get("name"),
        num_samples=raw.get("num_samples", 1), scheduler=SchedulerSpec(**scheduler),
        budget=dict(raw.get("budget") or {}), max_concurrent_trials=raw.get("max_concurrent_trials"),
        variants={str(k): dict(v) if isinstance(v, Mapping) else v for k, v in (raw.get("variants") or {}).items()},
        search_space={str(k): parse_domain(str(k), v) for k, v in space.items()},
    )


def parse_domain(key: str, raw: Any) -> Domain:
    """``{kind: values}`` (one entry) as a ``Domain``.

    Raises:
        ValueError: naming ``search_space.<key>``: not one entry, an unknown kind, an empty list, a
            range that is not two numbers ``low < high`` (ints for randint, ``low > 0`` for loguniform).
    """
    where = f"search_space.{key}"
    kinds = get_args(DomainKind)
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise ValueError(f"{where}={raw!r} must be one of {{kind: values}} with kind in {list(kinds)}")
    kind, values = next(iter(raw.items()))
    _check_in(f"{where} kind", kind, kinds)
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("grid_search", "choice"):
        return Domain(kind, tuple(values))
    if len(values) != 2 or not all(_is_number(v) for v in values) or not values[0] < values[1]:
        raise ValueError(f"{where}: {kind} needs [low, high] with low < high, got {values!r}")
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise ValueError(f"{where}: randint needs integer [low, high), got {values!r}")
    if kind == "loguniform" and values[0] <= 0:
        raise ValueError(f"{where}: loguniform needs low > 0, got {values!r}")
    return Domain(kind, tuple(values) if kind == "randint" else tuple(float(v) for v in values))


def _resolve(config: TrainConfig, overrides: dict[str, Any], where: str) -> TrainConfig:
    try:
        return config.replace(overrides)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _check_key(where: str, key: Any) -> None:
    if not isinstance(key, str) or key.count(".") != 1 or not all(key.split(".")):
        raise ValueError(f"{where}: key {key!r} must look like section.key (e.g. optimizer.lr)")
    if key in RESERVED_KEYS:
        raise ValueError(f"{where}: key {key!r} is set by the sweep or kept from the base config; it cannot vary")


def _check_known(what: str, mapping: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = [k for k in mapping if k not in known]
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {list(known)}")


def _check_in(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} must be one of {list(allowed)}")


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
