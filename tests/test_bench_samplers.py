"""benchmarks/bench_samplers.py: each sampler spends exactly the evaluations it is given, and the
script runs end to end on a tiny model (FD finite, floor and rows in the JSON, a PNG plot)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _bench_helpers import load_bench

from diffusion_core.checkpoint import save_checkpoint
from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.unet import UNet

bench = load_bench("bench_samplers")


@pytest.mark.parametrize("sampler", bench.SAMPLERS)
@pytest.mark.parametrize("evals", [10, 20, 50, 100, 1000])
def test_settings_spend_exactly_the_budget(sampler: str, evals: int) -> None:
    settings = bench.settings_for(sampler, evals, snr=0.16)
    assert settings.network_evaluations(1000) == evals
    if sampler == "ancestral":
        assert (settings.sampler, settings.corrector_steps) == ("pc", 0)
    if sampler in ("dpm_solver", "dpm_solver_sde"):
        algorithm = "dpmsolver++" if sampler == "dpm_solver" else "sde-dpmsolver++"
        assert (settings.order, settings.spacing, settings.algorithm) == (2, "logsnr", algorithm)


def test_spacing_overrides_every_samplers_own() -> None:
    assert bench.settings_for("dpm_solver_sde", 20, snr=0.16, spacing="quadratic").spacing == "quadratic"
    assert bench.settings_for("ddim", 20, snr=0.16).spacing == "uniform"


def test_pc_refuses_an_odd_budget() -> None:
    with pytest.raises(ValueError, match="even number of evaluations, got 15"):
        bench.settings_for("pc", 15, snr=0.16)


@pytest.mark.slow
def test_runs_end_to_end_on_a_tiny_model(fmnist_shards: Path, fd_classifier_folder: Path, tmp_path: Path) -> None:
    unet = UNetConfig(image_size=28, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2),
                      num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_groups=4, num_heads=1)
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "ckpt", UNet(unet).state_dict(), unet, DiffusionConfig(num_timesteps=50))
    output = tmp_path / "bench_samplers.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--model", str(model), "--classifier", str(fd_classifier_folder), "--shards", str(fmnist_shards),
                    "--images", "8", "--evals", "2", "4", "--block", "4", "--threads", "1",
                    "--cells", "ancestral:50", "--no-compile", "--cache", str(tmp_path / "cache"), "--output", str(output)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(output.read_text())["figures"]
    cells = [(r["sampler"], r["evals"]) for r in result["rows"]]
    assert cells == [(s, e) for e in (2, 4) for s in bench.SAMPLERS] + [("ancestral", 50)]
    assert all(math.isfinite(r["fd"]) and r["fd"] > 0 and r["seconds_per_image"] > 0 for r in result["rows"])
    assert math.isfinite(result["floor"]) and result["images"] == 8 and result["compiled"] is False
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
