r"""Train a DDPM with Ray Train (DDP over CPU or GPU workers), tracked in MLflow.

    python pipelines/train.py --config configs/tiny_cpu.yaml train.total_steps=200   # local Ray instance
    python pipelines/train.py --config configs/fashion_mnist.yaml --dry-run           # print the resolved config

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////abs/mlflow.db"}}' -- \
        python pipelines/train.py --config configs/tiny_cpu.yaml data.shards=/abs/shards train.storage_path=/abs/runs

Without ``RAY_ADDRESS`` a private local Ray instance is started (``--num-cpus``); under
``ray job submit`` the job's cluster is used. A job runs in a copy of the working dir, so give it
absolute ``data.shards`` / ``train.storage_path`` and an ``MLFLOW_TRACKING_URI`` (the default
``<repo>/mlflow.db`` would land in that copy).

Re-running with the same ``train.run_name`` (and ``train.storage_path``) resumes that run from its
latest checkpoint and keeps logging into the same MLflow run. The config, the shard folder and the
cluster's resources are checked here, before any worker starts.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from pipelines.training.launcher import resolve_config, run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: ``--config FILE [--dry-run] [--num-cpus N] [section.key=value ...]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML training config (configs/*.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray instance started when RAY_ADDRESS is unset "
                             "(default: all cores); ignored when connecting to a cluster")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, values parsed as YAML (e.g. train.total_steps=200)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a bad config or bad data). SIGTERM (what
    ``ray job stop`` sends first) raises ``KeyboardInterrupt``, so the MLflow run ends KILLED."""
    args = parse_args(argv)
    try:
        config = resolve_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(config.to_yaml(), end="")
        return 0
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        outcome = run(config, args.num_cpus)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"run {outcome['run_name']} {'resumed and ' if outcome['resumed'] else ''}finished at step "
          f"{outcome['metrics'].get('step')}")
    print(f"checkpoints: {outcome['run_folder']}")
    print(f"last checkpoint: {outcome['checkpoint']}")
    print(f"MLflow run {outcome['mlflow_run_id']} at {outcome['mlflow_run_at']}")
    print(f"resume or extend with: train.run_name={outcome['run_name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
