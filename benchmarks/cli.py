"""Command-line options that every benchmark script shares: the description (the script's docstring),
``--output`` (the JSON written by ``report.write_report``; default ``benchmarks/results/<script>.json``),
``--threads`` and the lower bounds of the integer options. Standard library only, so that
``bench_gpu.py`` runs on a machine that has nothing but torch.

Result names: ``results/<script>.json`` is the script's default command; a run with other flags is
``results/<script>_<what differs>.json`` (flag names and values, e.g. ``bench_samplers_pc_snr0.32.json``,
``bench_serve_network_eager.json``), and a repeat of the same command adds ``_run2``, ``_run3``
(``bench_train_threads2_run2.json``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_output(script: str) -> Path:
    """``benchmarks/results/<script>.json`` (absolute): where ``script`` writes unless ``--output`` says."""
    return RESULTS_DIR / f"{script}.json"


def bench_parser(script: str, doc: str | None, output_name: str | None = None) -> argparse.ArgumentParser:
    """A parser described by the script's docstring ``doc`` (printed whole by ``--help``) with
    ``--output`` (a ``Path``, default ``default_output(output_name or script)``)."""
    name = output_name or script
    parser = argparse.ArgumentParser(prog=f"{script}.py", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=default_output(name),
                        help=f"results JSON (default benchmarks/results/{name}.json)")
    return parser


def add_threads(parser: argparse.ArgumentParser, default: int | list[int] | None, *, many: bool = False,
                help: str = "torch intra-op threads (torch.set_num_threads)") -> None:
    """``--threads``: one count, or with ``many`` a list of counts each measured in turn."""
    if many:
        parser.add_argument("--threads", type=int, nargs="+", default=default, help=help)
    else:
        parser.add_argument("--threads", type=int, default=default, help=help)


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, minimums: Mapping[str, float]) -> None:
    """Exit through ``parser.error`` (status 2) naming the first option below its minimum.

    Args:
        minimums: ``{attribute: minimum}``; a list-valued option (``nargs="+"``) is checked element by
            element; ``None`` values (an option left at a ``None`` default) are skipped.
    """
    for name, minimum in minimums.items():
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is not None and item < minimum:
                parser.error(f"--{name.replace('_', '-')}={item} must be >= {minimum}")
