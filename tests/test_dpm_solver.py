"""DPM-Solver++(2M) and SDE-DPM-Solver++(2M) step by step against diffusers'
DPMSolverMultistepScheduler (dpmsolver++ / sde-dpmsolver++, solver_order=2, midpoint, final sigma 0),
fed our timesteps, the same model and (SDE) the same z of each step: the x after every step must
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


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("spacing", ["logsnr", "uniform"])
@pytest.mark.parametrize("prediction", ["eps", "x_start", "v"])
@pytest.mark.parametrize("num_steps", [2, 10, 20])
def test_every_step_matches_diffusers(num_steps, prediction, spacing, algorithm):
    ours = GaussianDiffusion(DiffusionConfig(num_timesteps=T, prediction=prediction))
    model = ConvModel(seed=3)
    noise = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    inputs = []

    def recording(x, t):
        inputs.append(x.clone())
        return model(x, t)

    final = ours.dpm_solver_sample_loop(recording, (2, 1, 6, 6), num_steps=num_steps, spacing=spacing, noise=noise,
                                        clip_denoised=False, generator=torch.Generator().manual_seed(1),
                                        algorithm=algorithm)
    # the z our loop draws, in order (one per step but the last, after x_T, which is given)
    step_noise = torch.Generator().manual_seed(1)
    steps = sampling_timesteps(ours.alphas_cumprod, num_steps, spacing)
    theirs = DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        algorithm_type=algorithm, solver_order=2, prediction_type=PREDICTION_TYPES[prediction],
        lower_order_final=True, final_sigmas_type="zero",
    )
    theirs.set_timesteps(timesteps=steps.tolist())
    abar = torch.from_numpy(ours.alphas_cumprod[steps])
    theirs.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x = noise.clone()
    expected = [x]
    for i, t in enumerate(theirs.timesteps):
        z = torch.randn(x.shape, generator=step_noise) if i < num_steps - 1 else torch.zeros_like(x)
        x = theirs.step(model(x, torch.full((2,), int(t))), t, x, variance_noise=z).prev_sample
        expected.append(x)
    assert [int(t) for t in theirs.timesteps] == steps.tolist()
    tol = 1e-5 if algorithm == "dpmsolver++" else 1e-4  # the SDE's noise term: one more float32 rounding a step
    for got, want in zip(inputs + [final], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
