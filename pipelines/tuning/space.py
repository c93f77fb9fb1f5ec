"""A ``SweepSpec``'s search space as ``ray.tune`` objects, and a trial's config back as training
config overrides.

Tune's ``param_space`` holds each searched ``section.key`` under its own name, plus ``variant`` (a
grid over the spec's variant names) when the spec has variants; a trial's overrides are the
budget, then its variant's bundle, then its sampled values (later ones win).
"""

from __future__ import annotations

from typing import Any, Mapping

from ray import tune

from pipelines.tuning.spec import Domain, SweepSpec

VARIANT_KEY = "variant"


def to_tune(domain: Domain) -> Any:
    """The ``ray.tune`` object of ``domain`` (``grid_search``, ``choice``, ``uniform``,
    ``loguniform``, ``randint``)."""
    if domain.kind == "grid_search":
        return tune.grid_search(list(domain.values))
    if domain.kind == "choice":
        return tune.choice(list(domain.values))
    low, high = domain.values
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[domain.kind](low, high)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's ``param_space``: ``{"section.key": tune domain, ..., "variant": grid}``."""
    space = {key: to_tune(domain) for key, domain in spec.search_space.items()}
    if spec.variants:
        space[VARIANT_KEY] = tune.grid_search(list(spec.variants))
    return space


def trial_overrides(spec: SweepSpec, trial_config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` of one trial: budget, variant bundle, sampled values (numpy
    scalars as Python numbers)."""
    sampled = {key: _plain(trial_config[key]) for key in spec.search_space}
    variant = spec.variants.get(trial_config.get(VARIANT_KEY), {}) if spec.variants else {}
    return {**spec.budget, **variant, **sampled}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
