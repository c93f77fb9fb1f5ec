"""benchmarks/bench_guidance.py: which rows it draws at which cost, and an end-to-end run on two tiny
models (a class-conditional and an unconditional one) with the real FD classifier."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _bench_helpers import load_bench

from diffusion_core.checkpoint import save_checkpoint
from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.unet import UNet
from pipelines.data.shards.reader import read_split_numpy
from pipelines.evaluation.classifier import load_classifier

bench = load_bench("bench_guidance")


def test_plan_draws_guided_scales_again_at_half_the_steps() -> None:
    """Oracle: the rows written out by hand (guided scales cost 2 evaluations, so half the steps match s = 1)."""
    args = bench.parse_args(["--cond-model", "c", "--uncond-model", "u", "--classifier", "k", "--steps", "20",
                             "--scales", "0", "1", "2", "5"])
    rows = [(r["model"], r["scale"], r["steps"]) for r in bench.plan(args)]
    assert rows == [("unconditional", None, 20), ("conditional", 0.0, 20), ("conditional", 1.0, 20),
                    ("conditional", 2.0, 20), ("conditional", 5.0, 20), ("conditional", 2.0, 10),
                    ("conditional", 5.0, 10)]


def test_plan_with_a_guidance_interval_marks_guided_rows_and_fits_their_steps() -> None:
    """Oracle: the rows written out by hand; s in {0, 1} are never guided, so they carry no interval."""
    args = bench.parse_args(["--cond-model", "c", "--uncond-model", "u", "--classifier", "k", "--steps", "20",
                             "--scales", "1", "2", "--guidance-interval", "0.28", "5.42"])
    rows = [(r["model"], r["scale"], r["steps"], r.get("interval")) for r in bench.plan(args, lambda s: 14)]
    assert rows == [("unconditional", None, 20, None), ("conditional", 1.0, 20, None),
                    ("conditional", 2.0, 20, [0.28, 5.42]), ("conditional", 2.0, 14, [0.28, 5.42])]
    assert bench.row_key({"model": "conditional", "scale": 2.0, "steps": 14, "interval": [0.28, 5.42]}) != \
        bench.row_key({"model": "conditional", "scale": 2.0, "steps": 14})
    for bad in (["1", "0.5"], ["-1", "2"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--cond-model", "c", "--uncond-model", "u", "--classifier", "k",
                              "--guidance-interval", *bad])


def test_equal_evaluation_rows_take_the_most_steps_that_fit() -> None:
    """Oracle: the counted evaluations (``guided_network_evaluations``, tested against the network's own
    calls in tests/test_guidance.py) of the fitted steps and of one step more, on each side of the budget."""
    diffusion = GaussianDiffusion(DiffusionConfig(num_timesteps=1000))
    loaded = SimpleNamespace(diffusion=diffusion)
    fitted = bench.steps_within(loaded, 20, 2.0, [0.28, 5.42])
    assert bench.evaluations_per_image(loaded, fitted, 2.0, [0.28, 5.42]) <= 20
    assert bench.evaluations_per_image(loaded, fitted + 1, 2.0, [0.28, 5.42]) > 20
    assert bench.evaluations_per_image(loaded, 10, 2.0, None) == 20


def test_recommended_sampler_is_the_sde_solver_on_quadratic_steps() -> None:
    """Oracle: docs/sampling.md's recommendation (SDE-DPM-Solver++(2M), quadratic spacing)."""
    settings = bench.recommended_settings(20)
    assert (settings.sampler, settings.algorithm, settings.spacing, settings.order) == (
        "dpm_solver", "sde-dpmsolver++", "quadratic", 2)
    assert settings.network_evaluations(1000) == 20


def test_negative_or_infinite_scales_are_refused(capsys) -> None:
    """Oracle: the documented range of guidance_scale (finite, >= 0)."""
    for bad in ("-1", "inf"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--cond-model", "c", "--uncond-model", "u", "--classifier", "k", "--scales", bad])
        assert "--scales must be finite and >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_end_to_end_on_tiny_models(fmnist_shards: Path, fd_classifier_folder: Path, tmp_path: Path) -> None:
    """Oracles: the evaluation count of each row by hand; the overall class accuracy equals the mean of
    the per-class ones weighted by how many samples asked for each class (i mod 10 of 12 samples); the
    real-image accuracy recomputed from the classifier's logits on the first 12 val images."""
    def tiny(num_classes: int | None) -> UNetConfig:
        return UNetConfig(image_size=28, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2),
                          num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_groups=4, num_heads=1,
                          num_classes=num_classes)
    torch.manual_seed(0)
    models = {}
    for name, classes in (("cond", 10), ("uncond", None)):
        config = tiny(classes)
        models[name] = save_checkpoint(tmp_path / name, UNet(config).state_dict(), config,
                                       DiffusionConfig(num_timesteps=50))
    output = tmp_path / "bench_guidance.json"
    argv = ["--cond-model", str(models["cond"]), "--uncond-model", str(models["uncond"]),
            "--classifier", str(fd_classifier_folder), "--shards", str(fmnist_shards), "--images", "12",
            "--steps", "4", "--block", "6", "--threads", "1", "--cache", str(tmp_path / "cache"), "--output", str(output)]
    threads = torch.get_num_threads()
    try:
        bench.main([*argv, "--scales", "0", "3"])
        first = json.loads(output.read_text())["figures"]["rows"]
        bench.main([*argv, "--scales", "0", "1", "3"])  # continues the same JSON: draws s = 1 only
    finally:
        torch.set_num_threads(threads)
    result = json.loads(output.read_text())["figures"]
    assert result["rows"][:len(first)] == first  # kept as measured, not drawn again
    assert [(r["model"], r["scale"], r["evals"]) for r in result["rows"]] == [
        ("unconditional", None, 4), ("conditional", 0.0, 4), ("conditional", 3.0, 8), ("conditional", 3.0, 4),
        ("conditional", 1.0, 4)]
    asked = [sum(1 for i in range(12) if i % 10 == k) for k in range(10)]  # 2, 2, 1, ..., 1
    for row in result["rows"]:
        assert math.isfinite(row["fd"]) and row["fd"] > 0 and row["images"] == 12
        per_class = [row[f"sample_class_accuracy_{k}"] for k in range(10)]
        assert row["sample_class_accuracy"] == pytest.approx(sum(a * n for a, n in zip(per_class, asked, strict=True)) / 12)
    assert math.isfinite(result["floor"]) and result["num_classes"] == 10
    classifier, _ = load_classifier(fd_classifier_folder)
    images, labels = read_split_numpy(str(fmnist_shards), "val", limit=12)
    with torch.no_grad():
        predicted = classifier(torch.from_numpy(images)).argmax(dim=1).numpy()
    assert result["real_val_accuracy"] == pytest.approx(float((predicted == labels).mean()))
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="holds rows with images=12"):  # other settings: not mixed in
        bench.main([*argv, "--images", "10", "--scales", "1"])
