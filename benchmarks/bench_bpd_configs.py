"""Which training config gives the best test-set bits/dim at equal training wall time: the sweep
``configs/sweeps/bpd_configs.yaml`` run by ``pipelines.tuning``, then each trial's model scored on the
test split.

The sweep trains ``--config`` (default ``configs/fashion_mnist.yaml``) with each row's overrides times
each noise schedule (``--rows`` x ``--schedules``, one Ray Tune trial per pair, named ``<row>-<schedule>``)
for ``--minutes`` of training wall time (``train.max_minutes``; ``train.total_steps`` is raised to
``--max-steps`` so that the budget ends the run), one trial at a time, on the local Ray cluster (or
``$RAY_ADDRESS``), nested under one MLflow parent run. The rows (the sweep's variants):

* ``simple``: the config as it is (simple loss, fixed_small variance: the bound's variances are
  not learned);
* ``hybrid``: L_simple + 0.001 L_vlb with ``learned_range`` variances (Nichol & Dhariwal 2021, sec. 3.1);
* ``vlb_is``: L_vlb alone with ``learned_range`` and importance-sampled timesteps
  (``train.timestep_sampler: loss_second_moment``, Nichol & Dhariwal 2021, sec. 3.3).

The table is made from the sweep's MLflow child runs: each trial that logged a model is scored on the
first ``--test-images`` images of the shards' ``test`` split with the estimated bound (``--estimate`` K
stratified timesteps per image, over ``--workers`` Ray actors; ``evaluation.job.evaluate``, logged as an
evaluation run). A row's figures: steps reached, training minutes, the bound (total, its standard error
over images, L_T / sum of L_t / L_0), the last ``fd``, ``fd_floor`` and ``val_bpd`` the run logged, and
the model's URI. The JSON (default ``benchmarks/results/bench_bpd_configs_sweep.json``) is rewritten after
each row, and rows already in it are left out of the next sweep, so a study may be run in parts::

    python benchmarks/bench_bpd_configs.py --shards data/fashion-mnist-shards --minutes 30 \\
        --rows simple hybrid vlb_is --schedules linear cosine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from cli import bench_parser
from scoring import score_trial
from study import add_study_arguments, check_study_arguments, open_study, run_study
from table import Column, format_table

from pipelines.tuning.spec import SweepSpec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench_bpd_configs"
SWEEP = ROOT / "configs" / "sweeps" / "bpd_configs.yaml"
SCHEDULE_KEY = "diffusion.schedule"
#: The config values each row reports (``scoring.score_trial``): column -> the trial's MLflow param.
SWITCHES = {"loss": "diffusion.loss", "variance": "diffusion.variance", "schedule": SCHEDULE_KEY,
            "timestep_sampler": "train.timestep_sampler"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = bench_parser(SCRIPT, __doc__, output_name=f"{SCRIPT}_sweep")
    add_study_arguments(parser, sweep=SWEEP, storage=ROOT / "outputs" / "bench_bpd_runs", name_prefix="bpd-configs",
                        root=ROOT)
    parser.add_argument("--schedules", nargs="+", default=None, choices=("linear", "cosine"),
                        help="noise schedules (default: the sweep's grid)")
    args = parser.parse_args(argv)
    check_study_arguments(parser, args)
    return args


def study_spec(raw: Mapping[str, Any], rows: Sequence[str] | None, schedules: Sequence[str] | None,
               done: Sequence[str], minutes: float, max_steps: int) -> SweepSpec:
    """The study's sweep with one variant per (row, schedule) pair, named ``<row>-<schedule>``, leaving
    out the pairs in ``done``, and the budget ``--minutes`` / ``--max-steps``.

    Raises:
        ValueError: a row that is not a variant of the sweep, or nothing left to run.
    """
    variants = dict(raw.get("variants") or {})
    unknown = sorted(set(rows or ()) - set(variants))
    if unknown:
        raise ValueError(f"--rows {unknown} are not variants of the sweep; it has {list(variants)}")
    grid = (raw.get("search_space") or {}).get(SCHEDULE_KEY, {}).get("grid_search", ["linear"])
    pairs = {f"{row}-{schedule}": {**variants[row], SCHEDULE_KEY: schedule}
             for row in (rows or variants) for schedule in (schedules or grid)}
    left = {name: overrides for name, overrides in pairs.items() if name not in done}
    if not left:
        raise ValueError("every requested row is in the results already")
    space = {k: v for k, v in (raw.get("search_space") or {}).items() if k != SCHEDULE_KEY}
    return spec_from_dict({**raw, "variants": left, "search_space": space,
                           "budget": {"train.max_minutes": minutes, "train.total_steps": max_steps}})


COLUMNS = (
    Column("row", "row"), Column("loss", "loss"), Column("variance", "variance"), Column("schedule", "schedule"),
    Column("sampler", "timestep_sampler"), Column("steps", "steps"), Column("test bpd", "test_bpd", ".4f"),
    Column("s.e.", "test_bpd_stderr_images", ".3f"), Column("L_0", "decoder_bpd", ".3f"), Column("FD", "fd", ".2f"),
)


def table(rows: list[dict[str, Any]]) -> str:
    """Text table of the rows."""
    return format_table(rows, COLUMNS)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    study = open_study(args, lambda raw, done: study_spec(raw, args.rows, args.schedules, done, args.minutes,
                                                          args.max_steps))
    run_study(study, args, argv, SCRIPT, "bpd-configs", table=table,
              score=lambda trial, client: score_trial(trial, client, study.shards, args.test_images, args.estimate,
                                                      args.workers, SWITCHES))


if __name__ == "__main__":
    main()
