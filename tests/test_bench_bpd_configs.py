"""benchmarks/bench_bpd_configs.py: the study is the sweep configs/sweeps/bpd_configs.yaml (one trial per
row and schedule), each trial's model is scored on the test split and lands in the JSON; rows already
measured are left out of the next sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from _bench_helpers import load_bench
from _train_helpers import FAST, TINY_CONFIG

from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.training.config import load_config

bench = load_bench("bench_bpd_configs")


def test_the_study_is_every_row_times_every_schedule_less_the_rows_done() -> None:
    raw = yaml.safe_load(bench.SWEEP.read_text())
    spec = bench.study_spec(raw, None, None, [], minutes=30, max_steps=10**6)
    assert list(spec.variants) == ["simple-linear", "simple-cosine", "hybrid-linear", "hybrid-cosine",
                                   "vlb_is-linear", "vlb_is-cosine"]
    assert spec.variants["vlb_is-cosine"] == {**raw["variants"]["vlb_is"], "diffusion.schedule": "cosine"}
    assert dict(spec.budget) == {"train.max_minutes": 30, "train.total_steps": 10**6} and not spec.search_space
    spec.check_against(load_config(TINY_CONFIG))
    left = bench.study_spec(raw, ["hybrid", "vlb_is"], ["cosine"], ["hybrid-cosine"], minutes=1, max_steps=5)
    assert list(left.variants) == ["vlb_is-cosine"]
    with pytest.raises(ValueError, match=r"--rows \['other'\] are not variants"):
        bench.study_spec(raw, ["other"], None, [], minutes=1, max_steps=5)
    with pytest.raises(ValueError, match="in the results already"):
        bench.study_spec(raw, ["simple"], ["linear"], ["simple-linear"], minutes=1, max_steps=5)


@pytest.mark.slow
def test_one_row_end_to_end(ray_local, train_sandbox: Path, fashion_mnist_dir: Path, tmp_path: Path, capsys,
                            monkeypatch) -> None:
    shards = tmp_path / "shards"  # 80 train images (66 train / 14 val) and the first 80 t10k images as test
    run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(shards), limit=80, val_fraction=0.2))
    output = tmp_path / "bench_bpd_configs.json"
    fast = [f"{key}={value}" for key, value in FAST.items() if key != "train.total_steps"]
    monkeypatch.chdir(tmp_path)  # relative paths, as in docs/training.md's command: the workers run elsewhere
    argv = ["--config", str(TINY_CONFIG), "--shards", "shards", "--storage", "runs",
            "--rows", "vlb_is", "--schedules", "linear", "--minutes", "0.001", "--test-images", "6",
            "--estimate", "4", "--workers", "1", "--output", str(output), "--name", "bpd-test", "--set", *fast]
    bench.main(argv)
    figures = json.loads(output.read_text())["figures"]
    row = figures["rows"][0]
    assert (row["row"], row["loss"], row["variance"], row["timestep_sampler"], row["schedule"]) == (
        "vlb_is-linear", "vlb", "learned_range", "loss_second_moment", "linear")
    assert row["steps"] == 1 and row["outcome"] == "finished"  # 60 ms of budget: spent at the first log step
    assert math.isfinite(row["test_bpd"]) and row["test_bpd_stderr_images"] > 0 and row["test_images"] == 6
    assert row["prior_bpd"] + row["terms_bpd"] + row["decoder_bpd"] == pytest.approx(row["test_bpd"], rel=1e-5)
    assert row["model_uri"] == f"runs:/{row['train_run_id']}/model" and figures["sweep_name"] == "bpd-test"
    with pytest.raises(ValueError, match="in the results already"):  # measured already: nothing to run
        bench.main(argv)
    assert json.loads(output.read_text())["figures"]["rows"] == [row]
