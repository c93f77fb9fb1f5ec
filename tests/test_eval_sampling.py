"""The sample grids of evaluate.py and training take any sampler: the command line's
SamplerSettings, the MLflow params describing them, and sample_grid = generate (fast, no MLflow)."""

from __future__ import annotations

import pytest
import torch
from _diffusion_helpers import (
    ConvModel,
    single_thread,  # noqa: F401 (autouse fixture)
)

from diffusion_core import DiffusionConfig, GaussianDiffusion
from diffusion_core.generate import SamplerSettings, generate, seeded_generator
from pipelines.evaluate import parse_args, settings_from_args
from pipelines.evaluation.metrics import sample_grid, sampler_params

BASE = ["--model", "m", "--shards", "s"]


def test_command_line_sampler_settings_keep_the_old_defaults() -> None:
    assert settings_from_args(parse_args(BASE)).sampling == SamplerSettings("ddim", 50)
    settings = settings_from_args(parse_args([*BASE, "--sampler", "pc", "--sample-steps", "8", "--corrector-steps",
                                              "2", "--snr", "0.1", "--spacing", "quadratic"]))
    assert settings.sampling == SamplerSettings("pc", 8, spacing="quadratic", corrector_steps=2, snr=0.1)
    assert settings.sample_steps == 8
    dpm = settings_from_args(parse_args([*BASE, "--sampler", "dpm_solver", "--order", "1"])).sampling
    assert (dpm.order, dpm.spacing, dpm.algorithm) == (1, "logsnr", "dpmsolver++")
    sde = settings_from_args(parse_args([*BASE, "--sampler", "dpm_solver", "--algorithm", "sde-dpmsolver++"])).sampling
    assert sde == SamplerSettings("dpm_solver", 50, algorithm="sde-dpmsolver++")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sampler", "euler"], "invalid choice: 'euler'"),
        (["--sampler", "dpm_solver", "--order", "3"], "order=3 must be an integer in [1, 2]"),
        (["--sampler", "langevin", "--corrector-steps", "0"], "corrector_steps=0 must be an integer >= 1"),
        (["--snr", "-1"], "snr=-1.0 must be a number"),
        (["--spacing", "cosine"], "invalid choice: 'cosine'"),
        (["--algorithm", "sde"], "invalid choice: 'sde'"),
    ],
)
def test_bad_sampler_flags_exit_with_the_field(flags, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args([*BASE, *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_sampler_params() -> None:
    assert sampler_params(SamplerSettings("ddim", 50), 1000) == {
        "sample_sampler": "ddim", "sample_eta": 0.0, "sample_spacing": "uniform", "sample_clip_denoised": True,
        "sample_steps": 50, "sample_network_evaluations": 50}
    assert sampler_params(SamplerSettings("ddpm"), 40)["sample_steps"] == 40
    pc = sampler_params(SamplerSettings("pc", 10, corrector_steps=2, snr=0.2), 40)
    assert (pc["sample_corrector_steps"], pc["sample_snr"], pc["sample_network_evaluations"]) == (2, 0.2, 30)
    with pytest.raises(ValueError, match="num_steps=41"):
        sampler_params(SamplerSettings("ddim", 41), 40)


@pytest.mark.parametrize("settings", [SamplerSettings("ddim", 5), SamplerSettings("pc", 3, corrector_steps=1),
                                      SamplerSettings("dpm_solver", 4)], ids=lambda s: s.sampler)
def test_sample_grid_is_generate_with_the_settings(settings: SamplerSettings) -> None:
    diffusion, model = GaussianDiffusion(DiffusionConfig(num_timesteps=30)), ConvModel()
    images, png = sample_grid(diffusion, model, (1, 6, 6), 4, settings, seed=5)
    assert torch.equal(images, generate(diffusion, model, (4, 1, 6, 6), settings, seeded_generator(5)))
    assert png.startswith(b"\x89PNG")
