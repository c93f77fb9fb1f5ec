"""The shared benchmark harness (benchmarks/cli.py, report.py, table.py, timing.py): one set of options,
one results schema, one table printer and one timing loop; and every results JSON follows the schema."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _bench_helpers import BENCHMARKS, load_bench

cli = load_bench("cli")
report = load_bench("report")
table = load_bench("table")
timing = load_bench("timing")


def test_parser_defaults_output_to_the_scripts_results_file_and_checks_minimums(capsys) -> None:
    parser = cli.bench_parser("bench_x", "Doc of bench_x.")
    cli.add_threads(parser, [1, 2], many=True)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args([])
    assert args.output == BENCHMARKS / "results" / "bench_x.json" and args.threads == [1, 2]
    cli.require_at_least(parser, args, {"batch": 1, "threads": 1})
    with pytest.raises(SystemExit) as exit_info:
        cli.require_at_least(parser, parser.parse_args(["--threads", "2", "0"]), {"threads": 1})
    assert exit_info.value.code == 2 and "--threads=0 must be >= 1" in capsys.readouterr().err


def test_report_has_the_fixed_keys_and_round_trips(tmp_path: Path) -> None:
    built = report.build_report("bench_x", ["--quick", "a b"], {"cpu_count": 2}, 1.5,
                                {"rows": [{"fps": 3.0}], "bad": float("nan")})
    assert list(built) == list(report.REPORT_KEYS) == ["date", "commit", "machine", "command", "figures"]
    assert built["command"] == "python benchmarks/bench_x.py --quick 'a b'"
    assert built["machine"]["cpu_count"] == 2 and built["machine"]["load_average_1m"]["start"] == 1.5
    assert built["machine"]["load_average_1m"]["end"] >= 0 and built["date"].endswith("+00:00")
    assert built["commit"] is None or len(built["commit"].removesuffix("-dirty")) == 7
    written = report.write_report(tmp_path / "sub" / "out.json", built)
    assert written.is_absolute() and report.read_figures(written) == {"rows": [{"fps": 3.0}], "bad": None}
    (tmp_path / "old.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="missing"):
        report.read_figures(tmp_path / "old.json")


@pytest.mark.parametrize("path", sorted((BENCHMARKS / "results").glob("*.json")), ids=lambda p: p.name)
def test_every_recorded_result_follows_the_schema(path: Path) -> None:
    recorded = json.loads(path.read_text())
    assert list(recorded) == list(report.REPORT_KEYS)
    assert isinstance(recorded["figures"], dict) and isinstance(recorded["command"], str)
    assert set(recorded["machine"]["load_average_1m"]) == {"start", "end"}
    text = path.read_text()
    for spelling in ("load_average_before", "load_average_after", "load_avg", "load_average_1min",
                     "load_average_1m_end", '"load_average"'):
        assert spelling not in text, spelling


def test_table_aligns_columns_and_prints_none_as_dash() -> None:
    columns = [table.Column("name", "name", align="<"), table.Column("rate", "rate", ".2f"),
               table.Column("twice", lambda r: r["rate"] and r["rate"] * 2, ".1f")]
    text = table.format_table([{"name": "a", "rate": 1.0}, {"name": "long name", "rate": None}], columns, "title")
    assert text.splitlines() == [
        "title",
        "name       rate  twice",
        "----------------------",
        "a          1.00    2.0",
        "long name     -      -",
    ]


def test_time_calls_times_only_the_calls_after_the_warmup() -> None:
    calls: list[int] = []
    synced: list[int] = []

    def call(i: int) -> None:
        calls.append(i)
        time.sleep(0.02 if i == 0 else 0.001)

    result = timing.time_calls(call, 3, warmup=2, sync=lambda: synced.append(1))
    assert calls == [0, 1, 2, 3, 4] and len(result.seconds) == 3
    assert result.first_s >= 0.02 and result.warmup_s >= result.first_s and result.best < 0.02
    assert result.median == sorted(result.seconds)[1] and result.total == pytest.approx(sum(result.seconds))
    spanned = timing.time_calls(call, 4, sync_each=False)
    assert len(set(spanned.seconds)) == 1 and spanned.first_s is None
    with pytest.raises(ValueError, match="calls=0"):
        timing.time_calls(call, 0)


def test_progress_timer_stops_the_loop_after_its_limit() -> None:
    steps: list[int] = []

    def loop(progress) -> None:
        for step in range(100):
            time.sleep(0.001)
            steps.append(step)
            progress(step, 100)

    result = timing.ProgressTimer(warmup=2, limit=3).run(loop)
    assert steps == [0, 1, 2, 3, 4] and len(result.seconds) == 3 and result.warmup_s > 0
    steps.clear()
    whole = timing.ProgressTimer(sync_each=False).run(lambda p: [p(s, 4) for s in range(4)])
    assert len(whole.seconds) == 4 and len(set(whole.seconds)) == 1
