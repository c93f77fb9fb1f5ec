"""benchmarks/bench_train.py: the precision each comparison trains in, and the bf16 / fp32 ratios it reports."""

from __future__ import annotations

import pytest
from _bench_helpers import load_bench

bench = load_bench("bench_train")


def test_precision_flag_sets_both_loops_precision(tmp_path) -> None:
    """Oracle: the config's ``scaling.precision``, read by both the plain loop and the Ray job's
    ``configure_torch``; fp32 unless asked."""
    args = bench.parse_args(["--precision", "fp32", "bf16"])
    assert args.precision == ["fp32", "bf16"] and bench.parse_args([]).precision == ["fp32"]
    assert bench.bench_config(args, 1, str(tmp_path), "bf16").scaling.precision == "bf16"
    assert bench.bench_config(args, 1, str(tmp_path)).scaling.precision == "fp32"
    with pytest.raises(SystemExit):
        bench.parse_args(["--precision", "fp16"])


def test_precision_ratios_divide_each_loop_by_its_fp32_run() -> None:
    """Oracle: the ratios written out by hand; no ratio for a thread count measured in one precision."""
    def result(threads: int, precision: str, ray: float, plain: float) -> dict:
        return {"torch_threads": threads, "precision": precision,
                "loops": {"ray": {"mean": ray}, "plain_before": {"mean": plain}}}

    results = [result(1, "fp32", 40.0, 42.0), result(1, "bf16", 60.0, 63.0), result(2, "fp32", 70.0, 72.0)]
    assert bench.precision_ratios(results) == {"1": {"ray": 1.5, "plain_before": 1.5}}
    assert bench.precision_ratios(results[:1]) == {}
