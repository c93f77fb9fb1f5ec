"""benchmarks/bench_bpd_configs.py: a row trains under its wall-time budget, is scored on the test
split, and lands in the JSON; rows already measured are skipped; the fourth row takes the better of
hybrid and vlb_is with the other schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _bench_helpers import load_bench
from _train_helpers import FAST, TINY_CONFIG

from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.training.config import load_config

bench = load_bench("bench_bpd_configs")


def test_the_fourth_row_flips_the_schedule_of_the_better_row() -> None:
    base = load_config(TINY_CONFIG)  # linear
    done = {"hybrid": {"test_bpd": 4.0}, "vlb_is": {"test_bpd": 3.9}}
    assert bench.row_overrides("other_schedule", done, base) == {**bench.ROWS["vlb_is"], "diffusion.schedule": "cosine"}
    done["hybrid"]["test_bpd"] = 3.5
    assert bench.row_overrides("other_schedule", done, base)["diffusion.loss"] == "hybrid"
    with pytest.raises(ValueError, match="needs the hybrid and vlb_is rows first"):
        bench.row_overrides("other_schedule", {"hybrid": done["hybrid"]}, base)


@pytest.mark.slow
def test_one_row_end_to_end(ray_local, train_sandbox: Path, fashion_mnist_dir: Path, tmp_path: Path, capsys,
                            monkeypatch) -> None:
    shards = tmp_path / "shards"  # 80 train images (66 train / 14 val) and the first 80 t10k images as test
    run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(shards), limit=80, val_fraction=0.2))
    output = tmp_path / "bench_bpd_configs.json"
    fast = [f"{key}={value}" for key, value in FAST.items() if key != "train.total_steps"]
    monkeypatch.chdir(tmp_path)  # relative paths, as in docs/training.md's command: the workers run elsewhere
    argv = ["--config", str(TINY_CONFIG), "--shards", "shards", "--storage", "runs",
            "--rows", "vlb_is", "--minutes", "0.001", "--test-images", "6", "--estimate", "4", "--workers", "1",
            "--output", str(output), "--set", *fast]
    bench.main(argv)
    row = json.loads(output.read_text())["figures"]["rows"][0]
    assert (row["row"], row["loss"], row["variance"], row["timestep_sampler"]) == (
        "vlb_is", "vlb", "learned_range", "loss_second_moment")
    assert row["steps"] == 1  # 60 ms of budget: spent at the first log step
    assert math.isfinite(row["test_bpd"]) and row["test_bpd_stderr_images"] > 0 and row["test_images"] == 6
    assert row["prior_bpd"] + row["terms_bpd"] + row["decoder_bpd"] == pytest.approx(row["test_bpd"], rel=1e-5)
    assert row["model_uri"].startswith("models:/ddpm-test-bpd-vlb_is/")
    bench.main(argv)  # measured already: skipped, the JSON unchanged
    assert "vlb_is: already in" in capsys.readouterr().out
    assert json.loads(output.read_text())["figures"]["rows"] == [row]
