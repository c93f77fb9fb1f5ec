r"""Sweep training configs with Ray Tune; compare the trials in MLflow (docs/sweeps.md).

    python pipelines/sweep.py --config configs/tiny_cpu.yaml --sweep configs/sweeps/tiny_lr.yaml
    python pipelines/sweep.py --config configs/fashion_mnist.yaml --sweep configs/sweeps/bpd_configs.yaml \
        --name bpd-study --register-best
    python pipelines/sweep.py --config configs/fashion_mnist.yaml --sweep configs/sweeps/bpd_configs.yaml \
        --name bpd-study --resume                    # after the driver was killed: finish the rest

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////abs/mlflow.db"}}' -- \
        python pipelines/sweep.py --config configs/tiny_cpu.yaml --sweep configs/sweeps/tiny_lr.yaml \
        data.shards=/abs/shards train.storage_path=/abs/runs

Every trial is a ``pipelines/train.py`` run of the base config with the trial's values, nested
under the sweep's MLflow run. The sweep file and the base config (with its ``section.key=value``
overrides) are checked before any trial starts; an error exits with status 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from pipelines.training.launcher import resolve_config
from pipelines.tuning.driver import SweepRequest, run_sweep
from pipelines.tuning.spec import load_sweep


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: ``--config FILE --sweep FILE [--name N] [--resume] [--register-best]
    [--num-cpus N] [section.key=value ...]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML training config every trial starts from (configs/*.yaml)")
    parser.add_argument("--sweep", required=True, help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--name", default=None,
                        help="the sweep's name (folder <train.storage_path>/sweeps/<name>, MLflow parent run); "
                             "default: the sweep file's `name`, else <sweep file stem>-<YYYYmmdd-HHMMSS>")
    parser.add_argument("--resume", action="store_true",
                        help="finish the interrupted sweep of this --name (Tune's restore): finished trials are "
                             "kept, unfinished ones resume from their checkpoints")
    parser.add_argument("--register-best", action="store_true",
                        help="register the best trial's model as tracking.registered_model_name")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray instance started when RAY_ADDRESS is unset "
                             "(default: all cores); ignored when connecting to a cluster")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="base config overrides, values parsed as YAML (e.g. train.bpd_every=0)")
    return parser.parse_args(argv)


def build_request(args: argparse.Namespace) -> SweepRequest:
    """Load, resolve and cross-check the base config and the sweep.

    Raises:
        ValueError / FileNotFoundError: naming the bad key or file.
    """
    base = resolve_config(args.config, args.overrides).replace({"train.run_name": None})
    spec = load_sweep(args.sweep)
    spec.check_against(base)
    if args.register_best and not base.tracking.registered_model_name:
        raise ValueError("--register-best needs tracking.registered_model_name (the name to register under)")
    name = args.name or spec.name
    if args.resume and not name:
        raise ValueError("--resume needs the sweep's --name (printed when it started)")
    name = name or f"{Path(args.sweep).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if "/" in name or name in (".", ".."):
        raise ValueError(f"--name={name!r} must be a plain folder name (no '/')")
    return SweepRequest(base=base, spec=spec, name=name, sweep_text=Path(args.sweep).read_text(),
                        resume=args.resume, register_best=args.register_best, num_cpus=args.num_cpus)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a bad config, sweep or data). SIGTERM (what
    ``ray job stop`` sends first) raises ``KeyboardInterrupt``, so the parent run ends KILLED."""
    args = parse_args(argv)
    try:
        request = build_request(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        outcome = run_sweep(request)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"sweep {outcome['name']}: {len(outcome['rows'])} trials; results: {outcome['results']}")
    print(f"MLflow parent run {outcome['parent_run_id']} at {outcome['parent_run_at']}")
    if outcome["best_config"]:
        print(f"best config: {outcome['best_config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
