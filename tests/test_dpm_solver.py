"""DPM-Solver++(2M) step by step against diffusers' DPMSolverMultistepScheduler (dpmsolver++,
solver_order=2, final sigma 0), fed our timesteps and the same model: the x after every step must
agree. diffusers keeps its sigmas in float32, so they are replaced by the same float64 values
sqrt((1 - abar) / abar) at our timesteps (its own formula, from our float64 alphas_cumprod); it still
computes each step in float32, as ours does, so the tolerance is float32 rounding."""

from __future__ import annotations

import pytest
import torch
from _diffusion_helpers import ConvModel, single_thread  # noqa: F401 (autouse fixture)

from diffusion_core import DiffusionConfig, GaussianDiffusion
from diffusion_core.timesteps import sampling_timesteps

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

T = 1000
PREDICTION_TYPES = {"eps": "epsilon", "x_start": "sample", "v": "v_prediction"}


@pytest.mark.parametrize("spacing", ["logsnr", "uniform"])
@pytest.mark.parametrize("prediction", ["eps", "x_start", "v"])
@pytest.mark.parametrize("num_steps", [2, 10, 20])
def test_every_step_matches_diffusers(num_steps, prediction, spacing):
    ours = GaussianDiffusion(DiffusionConfig(num_timesteps=T, prediction=prediction))
    model = ConvModel(seed=3)
    noise = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    inputs = []

    def recording(x, t):
        inputs.append(x.clone())
        return model(x, t)

    final = ours.dpm_solver_sample_loop(recording, (2, 1, 6, 6), num_steps=num_steps, spacing=spacing, noise=noise,
                                        clip_denoised=False)
    steps = sampling_timesteps(ours.alphas_cumprod, num_steps, spacing)
    theirs = DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        algorithm_type="dpmsolver++", solver_order=2, prediction_type=PREDICTION_TYPES[prediction],
        lower_order_final=True, final_sigmas_type="zero",
    )
    theirs.set_timesteps(timesteps=steps.tolist())
    abar = torch.from_numpy(ours.alphas_cumprod[steps])
    theirs.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x = noise.clone()
    expected = [x]
    for t in theirs.timesteps:
        x = theirs.step(model(x, torch.full((2,), int(t))), t, x).prev_sample
        expected.append(x)
    assert [int(t) for t in theirs.timesteps] == steps.tolist()
    for got, want in zip(inputs + [final], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
