"""benchmarks/bench_recipes.py: the study is the sweep configs/sweeps/recipes.yaml (one trial per recipe),
every variant fits configs/fashion_mnist.yaml, and each trial's model is scored the same way (FD of the
recommended sampler's samples with its floor, class shares, the test bound) into the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from _bench_helpers import load_bench
from _train_helpers import FAST, REPO_ROOT, TINY_CONFIG, fd_overrides

from pipelines import sweep
from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.evaluation.fd import StatsCache, reference_and_floor
from pipelines.evaluation.features import build_feature_net
from pipelines.training.config import load_config
from pipelines.tuning.spec import load_sweep

bench = load_bench("bench_recipes")
BASE = REPO_ROOT / "configs" / "fashion_mnist.yaml"
RECIPES = ["baseline", "min_snr", "v_min_snr", "edm", "bf16", "ema_9999", "bpd_baseline"]


def test_every_recipe_passes_the_sweep_check_against_the_fashion_mnist_config() -> None:
    """Oracle: sweep.py's own validation before a sweep starts (build_request: the base config resolved,
    the sweep file loaded and check_against it, which resolves every variant with the budget)."""
    request = sweep.build_request(sweep.parse_args(["--config", str(BASE), "--sweep", str(bench.SWEEP)]))
    spec = request.spec
    assert list(spec.variants) == RECIPES
    assert (spec.metric, spec.mode, spec.scheduler.name, spec.max_concurrent_trials) == ("fd", "min", "fifo", 1)
    assert spec.budget["train.max_minutes"] == 30 and request.base.train.fd_every == load_config(BASE).train.fd_every
    for name, overrides in spec.variants.items():  # each variant alone, with the budget, as its trial runs it
        trial = load_config(BASE).replace({**spec.budget, **overrides})
        assert trial.train.max_minutes == 30, name


def test_the_recipes_switch_what_their_names_say() -> None:
    """Oracle: the switches as the issue lists them, read back from the resolved configs."""
    spec = load_sweep(bench.SWEEP)
    base = load_config(BASE)
    configs = {name: base.replace(dict(overrides)) for name, overrides in spec.variants.items()}
    assert configs["baseline"] == base
    got = {name: (c.diffusion.prediction, c.diffusion.loss_weighting, c.diffusion.timestep_distribution,
                  c.scaling.precision, c.train.ema_decay) for name, c in configs.items()}
    assert got == {
        "baseline": ("eps", "none", "uniform", "auto", 0.999),
        "min_snr": ("eps", "min_snr", "uniform", "auto", 0.999),
        "v_min_snr": ("v", "min_snr", "uniform", "auto", 0.999),
        "edm": ("v", "edm", "edm_lognormal", "auto", 0.999),
        "bf16": ("eps", "none", "uniform", "bf16", 0.999),
        "ema_9999": ("eps", "none", "uniform", "auto", 0.9999),
        "bpd_baseline": ("eps", "none", "uniform", "auto", 0.999),
    }
    assert configs["min_snr"].diffusion.min_snr_gamma == configs["v_min_snr"].diffusion.min_snr_gamma == 5.0


def test_bpd_baseline_is_the_bpd_config_less_the_budget_and_the_registered_name() -> None:
    """Oracle: the two config files compared key by key."""
    def flat(path: Path) -> dict[str, object]:
        return {f"{section}.{key}": value for section, values in yaml.safe_load(path.read_text()).items()
                for key, value in values.items()}
    base, bpd = flat(BASE), flat(REPO_ROOT / "configs" / "fashion_mnist_bpd.yaml")
    differences = {key: bpd[key] for key in bpd if base.get(key, object()) != bpd[key]}
    left_out = {"train.total_steps", "train.max_minutes", "tracking.registered_model_name"}
    assert left_out <= set(differences)
    variant = load_sweep(bench.SWEEP).variants["bpd_baseline"]
    assert dict(variant) == {k: v for k, v in differences.items() if k not in left_out}
    assert not set(base) - set(bpd)  # the bpd config drops nothing of the base


def test_the_study_is_the_requested_rows_less_the_rows_done() -> None:
    raw = yaml.safe_load(bench.SWEEP.read_text())
    spec = bench.study_spec(raw, None, [], minutes=7, max_steps=10**6)
    assert list(spec.variants) == RECIPES and spec.variants["edm"] == raw["variants"]["edm"]
    assert dict(spec.budget) == {"train.max_minutes": 7, "train.total_steps": 10**6}
    left = bench.study_spec(raw, ["edm", "bf16"], ["edm"], minutes=1, max_steps=5)
    assert list(left.variants) == ["bf16"]
    with pytest.raises(ValueError, match=r"--rows \['other'\] are not variants"):
        bench.study_spec(raw, ["other"], [], minutes=1, max_steps=5)
    with pytest.raises(ValueError, match="in the results already"):
        bench.study_spec(raw, ["baseline"], ["baseline"], minutes=1, max_steps=5)


def test_class_shares_by_hand() -> None:
    """Oracle: 8 samples over K = 4 classes counted by hand: shares 4/8, 2/8, 2/8, 0;
    TV = (|1/2 - 1/4| + 0 + 0 + |0 - 1/4|) / 2 = 1/4."""
    shares = bench.class_shares(np.array([0, 0, 1, 0, 2, 1, 2, 0]), 4)
    assert shares == {"class_shares": [0.5, 0.25, 0.25, 0.0], "class_share_min": 0.0, "class_share_max": 0.5,
                      "class_share_tv": 0.25}
    assert bench.class_shares(np.arange(10), 10)["class_share_tv"] == pytest.approx(0.0)
    assert bench.class_shares(np.zeros(5, np.int64), 10)["class_share_tv"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        bench.class_shares(np.array([0, 4]), 4)


def test_flags_below_their_minimum_are_refused(capsys) -> None:
    for flag, value in (("--images", "1"), ("--minutes", "0"), ("--steps", "1")):
        with pytest.raises(SystemExit):
            bench.parse_args([flag, value])
        assert flag in capsys.readouterr().err


@pytest.mark.slow
def test_one_recipe_end_to_end(ray_local, train_sandbox: Path, fashion_mnist_dir: Path, fd_classifier_folder: Path,
                                tmp_path: Path, monkeypatch) -> None:
    """The edm recipe (every switch off its default) of configs/tiny_cpu.yaml, 2 steps, scored with N = 12 samples of the recommended
    sampler and the bound on 6 test images. Oracles: the floor recomputed from the same real slices;
    the shares' TV from the shares; the switches against the sweep file."""
    import torch

    shards = tmp_path / "shards"  # 80 train images (66 train / 14 val) and the first 80 t10k images as test
    run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(shards), limit=80, val_fraction=0.2))
    output = tmp_path / "bench_recipes.json"
    fast = [f"{key}={value}" for key, value in {**FAST, **{k.replace("__", "."): v for k, v in
                                                          fd_overrides(fd_classifier_folder).items()}}.items()
            if key != "train.total_steps"]
    monkeypatch.chdir(tmp_path)  # relative paths: the workers run elsewhere
    argv = ["--config", str(TINY_CONFIG), "--shards", "shards", "--storage", "runs", "--rows", "edm",
            "--minutes", "10", "--max-steps", "2", "--classifier", str(fd_classifier_folder), "--images", "12",
            "--steps", "4", "--block", "6", "--threads", "1", "--cache", "cache", "--test-images", "6",
            "--estimate", "4", "--workers", "1", "--output", str(output), "--name", "recipes-test", "--set", *fast]
    threads = torch.get_num_threads()
    try:
        bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    figures = json.loads(output.read_text())["figures"]
    rows = {row["row"]: row for row in figures["rows"]}
    assert list(rows) == ["edm"] and figures["sweep_name"] == "recipes-test"
    net = build_feature_net("classifier", classifier=str(fd_classifier_folder))
    _, floor = reference_and_floor(str(shards.resolve()), 12, net, StatsCache(tmp_path / "other-cache"))
    assert figures["floor"] == pytest.approx(floor) and figures["images"] == 12
    raw = yaml.safe_load(bench.SWEEP.read_text())
    for name, row in rows.items():
        assert row["outcome"] == "finished" and row["steps"] == 2 and row["images_per_s"] > 0
        assert math.isfinite(row["fd"]) and row["fd"] >= 0 and row["images"] == 12
        assert row["fd_floor"] == figures["floor"] and row["fd_over_floor"] == pytest.approx(row["fd"] / floor)
        shares = row["class_shares"]
        assert len(shares) == 10 and sum(shares) == pytest.approx(1.0) and all(12 * s == pytest.approx(round(12 * s)) for s in shares)
        assert (row["class_share_min"], row["class_share_max"]) == (min(shares), max(shares))
        assert row["class_share_tv"] == pytest.approx(0.5 * sum(abs(s - 0.1) for s in shares))
        assert math.isfinite(row["test_bpd"]) and row["test_bpd_stderr_images"] > 0 and row["test_images"] == 6
        assert row["prior_bpd"] + row["terms_bpd"] + row["decoder_bpd"] == pytest.approx(row["test_bpd"], rel=1e-5)
        assert row["train_fd"] is not None and row["model_uri"] == f"runs:/{row['train_run_id']}/model"
        assert row["overrides"] == (raw["variants"][name] or {})
    assert (rows["edm"]["prediction"], rows["edm"]["loss_weighting"], rows["edm"]["timestep_distribution"],
            float(rows["edm"]["edm_sigma_data"])) == ("v", "edm", "edm_lognormal", 0.5)
    with pytest.raises(ValueError, match="in the results already"):  # measured already: nothing to run
        bench.main(argv)
    assert [row["row"] for row in json.loads(output.read_text())["figures"]["rows"]] == [r["row"] for r in figures["rows"]]
