"""EDM's deterministic Heun sampler ("edm_heun": Karras et al. 2022, Algorithm 1 on the noise levels of
eq. 5) against closed forms.

On Gaussian data N(MU, S^2 I) (``_gaussian_chain``) the exact denoiser in EDM's scale
x = x_t / sqrt(abar_t) = x_0 + sigma eps (sigma^2 = (1 - abar_t) / abar_t) is linear,

    D(x; sigma) = MU + g(sigma) (x - MU),   g(sigma) = S^2 / (S^2 + sigma^2),

and the probability-flow ODE dx/dsigma = (x - D) / sigma = (x - MU) sigma / (S^2 + sigma^2) has the
solution x(sigma) - MU proportional to sqrt(S^2 + sigma^2). The sampler starts at
x = x_T / sqrt(abar_{T-1}) on sigma_max = sigma_{T-1}, integrates down to sigma_min = sigma_0, and
its last (Euler) step to sigma = 0 returns D(x; sigma_min). The ends of the grid are fixed, so as
``num_steps`` grows its output converges to the ODE solution followed by that last step:

    x_0 = MU + F (x_T / sqrt(abar_{T-1}) - MU),   F = S^2 / sqrt((S^2 + sigma_min^2) (S^2 + sigma_max^2)).

Heun's method is second order: doubling ``num_steps`` divides the error by about 4 (measured 4.24 and
4.13 from 32 to 64 to 128 steps on T = 1000; an Euler step in place of Heun's gives 1.97 and 2.00).
Every step being linear, the sampler's own output at any ``num_steps`` is also known exactly
(:func:`heun_factor`: the product of the per-step factors of Algorithm 1 on this D), which checks it
to float32 rounding and gives the exact moments of its samples for x_T ~ N(0, I) (mean MU (1 - F),
variance F^2 / abar_{T-1}). On a real (nonlinear) network every evaluation is compared with diffusers'
``HeunDiscreteScheduler`` on the same timesteps.
"""

from __future__ import annotations

import math
from typing import get_args

import numpy as np
import pytest
import torch
from _class_gaussians import ExactClassGaussians
from _diffusion_helpers import (
    ConvModel,
    OracleEps,
    grid_images,
    single_thread,  # noqa: F401 (autouse fixture)
)
from _gaussian_chain import MU, GaussianDenoiser, S, target

from deploy.errors import RequestError
from deploy.http_io import parse_json_model
from deploy.limits import resolve_num_steps
from deploy.request_models import SampleRequest
from diffusion_core import DiffusionConfig, GaussianDiffusion, RowGenerators
from diffusion_core.generate import SamplerSettings, generate, seeded_generator
from diffusion_core.guidance import classifier_free_guidance
from diffusion_core.samplers.registry import SAMPLERS, SamplerName
from diffusion_core.timesteps import karras_sigmas, karras_timesteps

T = 1000


def make(prediction: str = "eps", num_timesteps: int = T, **kwargs) -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(num_timesteps=num_timesteps, prediction=prediction, **kwargs))


def chain_sigmas(d: GaussianDiffusion) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of every timestep, float64 [T]."""
    return np.sqrt((1 - d.alphas_cumprod) / d.alphas_cumprod)


def heun_factor(d: GaussianDiffusion, num_steps: int) -> float:
    """F with output MU + F (x_T / sqrt(abar_{T-1}) - MU) of Algorithm 1 on the exact Gaussian D, in
    float64: with w = x - MU, d = k_i w (k_i = (1 - g_i) / sigma_i), the Euler step multiplies w by
    1 + h k_i (h = sigma_{i+1} - sigma_i), Heun's by 1 + h/2 (k_i + (1 + h k_i) k_{i+1}); the last step
    (to sigma = 0) returns D, i.e. multiplies w by g_{S-1}."""
    sigma = chain_sigmas(d)[karras_timesteps(d.alphas_cumprod, num_steps)]
    g = S**2 / (S**2 + sigma**2)
    k = (1 - g) / sigma
    factor = 1.0
    for i in range(num_steps - 1):
        h = sigma[i + 1] - sigma[i]
        factor *= 1 + h / 2 * (k[i] + (1 + h * k[i]) * k[i + 1])
    return factor * g[-1]


def ode_solution(d: GaussianDiffusion, x_t: torch.Tensor) -> torch.Tensor:
    """The limit S -> inf of the sampler from x_T (see the module docstring), float64."""
    sigma = chain_sigmas(d)
    factor = S**2 / math.sqrt((S**2 + sigma[0] ** 2) * (S**2 + sigma[-1] ** 2))
    return MU + factor * (x_t.double() / math.sqrt(d.alphas_cumprod[-1]) - MU)


def starting_noise(n: int = 7) -> torch.Tensor:
    return torch.linspace(-3.0, 3.0, n).reshape(n, 1, 1, 1)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------- noise levels
def test_karras_sigmas_are_eq_5():
    # sigma_max = 128 and sigma_min = 1 / 128 have 7th roots 2 and 1/2: the middle of three levels is
    # ((2 + 1/2) / 2)^7 = 1.25^7
    np.testing.assert_allclose(karras_sigmas(1 / 128, 128.0, 3), [128.0, 1.25**7, 1 / 128], rtol=1e-14)
    # five levels between 1 and 128: (2 - i/4)^7
    np.testing.assert_allclose(karras_sigmas(1.0, 128.0, 5), [2.0**7, 1.75**7, 1.5**7, 1.25**7, 1.0], rtol=1e-14)
    # EDM's CIFAR-10 setting (sigma 0.002 to 80, 18 steps), term by term
    sigmas = karras_sigmas(0.002, 80.0, 18)
    for i, sigma in enumerate(sigmas):
        assert sigma == pytest.approx((80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, rel=1e-13)
    assert sigmas[0] == pytest.approx(80.0, rel=1e-14) and sigmas[-1] == pytest.approx(0.002, rel=1e-12)
    np.testing.assert_allclose(karras_sigmas(0.5, 3.0, 6, rho=1.0), np.linspace(3.0, 0.5, 6), rtol=1e-14)
    assert karras_sigmas(0.002, 80.0, 1).tolist() == [80.0]
    for kwargs, message in [({"sigma_min": 0.0}, r"sigma_min=0.0"), ({"sigma_max": 0.001}, r"sigma_max=0.001"),
                            ({"num_steps": 0}, r"num_steps=0"), ({"rho": 0.0}, r"rho=0.0")]:
        with pytest.raises(ValueError, match=message):
            karras_sigmas(**{"sigma_min": 0.002, "sigma_max": 80.0, "num_steps": 5, **kwargs})


def test_karras_timesteps_are_the_nearest_levels():
    d = make()
    sigma = chain_sigmas(d)
    for num_steps in (2, 5, 10, 18, 40):
        steps = karras_timesteps(d.alphas_cumprod, num_steps)
        assert steps.dtype == np.int64 and steps[0] == T - 1 and steps[-1] == 0 and np.all(np.diff(steps) < 0)
        # each level of eq. 5 (sigma_min, sigma_max of the chain) lands on the timestep nearest in log sigma
        wanted = np.log(karras_sigmas(sigma[0], sigma[-1], num_steps))
        for t, level in zip(steps, wanted, strict=True):
            distance = abs(np.log(sigma[t]) - level)
            assert all(distance <= abs(np.log(sigma[n]) - level) for n in (t - 1, t + 1) if 0 <= n < T)
    assert karras_timesteps(d.alphas_cumprod, 1).tolist() == [T - 1]
    # levels denser than the timesteps are spread over consecutive timesteps: S = T visits all of them
    assert karras_timesteps(d.alphas_cumprod, T).tolist() == list(range(T - 1, -1, -1))
    with pytest.raises(ValueError, match=r"num_steps=1001 must be an integer in \[1, 1000\]"):
        karras_timesteps(d.alphas_cumprod, T + 1)


def test_karras_timesteps_spread_levels_that_share_a_timestep():
    # the cosine chain's last step jumps from sigma 642 to 2.0e4 (betas capped at 0.999): the first
    # levels of eq. 5 all fall between those two and go to T-1, T-2, ... in turn
    d = make(schedule="cosine")
    sigma = chain_sigmas(d)
    assert sigma[-1] / sigma[-2] > 30
    assert karras_timesteps(d.alphas_cumprod, 5).tolist() == [999, 998, 997, 937, 0]
    assert np.log(karras_sigmas(sigma[0], sigma[-1], 5))[3] == pytest.approx(np.log(sigma[937]), abs=1e-3)


# ---------------------------------------------------------------------------------- exact Gaussian data
@pytest.mark.parametrize("num_steps", [1, 2, 5, 18])
def test_each_step_is_algorithm_1(num_steps):
    d = make(num_timesteps=200)
    noise = starting_noise()
    x = d.edm_heun_sample_loop(GaussianDenoiser(d), noise.shape, num_steps=num_steps, noise=noise,
                               clip_denoised=False)
    expected = MU + heun_factor(d, num_steps) * (noise.double() / math.sqrt(d.alphas_cumprod[-1]) - MU)
    assert x.dtype == torch.float32 and x.shape == noise.shape
    # float32 rounding: x starts at |x_T| / sqrt(abar_{T-1}) ~ 470 in EDM's scale (S = 1 and 2 are off
    # by 3e-5 and 2e-3 on outputs of 0.3 and 265; the same loop in float64 matches to 1e-11)
    torch.testing.assert_close(x.double(), expected, rtol=5e-5, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_second_order_convergence_to_the_ode_solution(prediction):
    d = make(prediction)
    noise = starting_noise()
    exact = ode_solution(d, noise)
    errors = []
    for num_steps in (32, 64, 128):
        x = d.edm_heun_sample_loop(GaussianDenoiser(d), noise.shape, num_steps=num_steps, noise=noise,
                                   clip_denoised=False)
        errors.append((x.double() - exact).abs().max().item())
    # error(S) / error(2S) about 4 (measured 4.24, 4.13); an Euler step instead of Heun's gives 1.97, 2.00
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(3.5 < r < 5.0 for r in ratios), (errors, ratios)
    assert errors[-1] < 1e-3, errors


def test_samples_have_the_moments_of_the_exact_steps():
    d = make(num_timesteps=200)
    factor = heun_factor(d, 40)
    expected_mean, expected_var = MU * (1 - factor), factor**2 / d.alphas_cumprod[-1]
    # 40 steps: the samples are 2.84% wider than the data's N(MU, S^4 abar_0 / sigma_0^2), the
    # discretization error of the ODE (0.34% at 100 steps, 16.9% at 18)
    assert expected_var / target(d).variance - 1 == pytest.approx(0.0284, abs=1e-4)
    x = d.edm_heun_sample_loop(GaussianDenoiser(d), (2048, 1, 4, 4), num_steps=40, generator=seeded(0),
                               clip_denoised=False).double()
    n = x.numel()
    assert abs(x.mean().item() - expected_mean) < 5 * math.sqrt(expected_var / n)
    assert abs(x.var().item() / expected_var - 1) < 5 * math.sqrt(2 / n)


def test_every_prediction_is_the_same_sampler():
    # the same exact denoiser as eps, x_start, v and score models, and with learned_range's extra channels
    noise = starting_noise()
    runs = {}
    for prediction in ("eps", "x_start", "v", "score"):
        d = make(prediction, num_timesteps=200)
        runs[prediction] = d.edm_heun_sample_loop(GaussianDenoiser(d), noise.shape, num_steps=10, noise=noise,
                                                  clip_denoised=False)
    d = make("v", num_timesteps=200, variance="learned_range")
    denoiser = GaussianDenoiser(d)
    runs["learned_range"] = d.edm_heun_sample_loop(
        lambda x, t: torch.cat([denoiser(x, t), torch.zeros_like(x)], dim=1), noise.shape, num_steps=10,
        noise=noise, clip_denoised=False)
    for name, x in runs.items():
        torch.testing.assert_close(x, runs["eps"], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("prediction", ["eps", "x_start", "v", "score"])
def test_one_image_data_set_gives_that_image(prediction):
    d = make(prediction, num_timesteps=200)
    x0 = grid_images((1, 1, 5, 5), seed=8)
    oracle = OracleEps(d, x0)

    def model(x_t, t):
        return d.output_from_eps(x_t.double(), t, oracle(x_t, t).double()).to(x_t.dtype)

    samples = d.edm_heun_sample_loop(model, (3, 1, 5, 5), num_steps=10, generator=seeded(0), clip_denoised=False)
    assert samples.shape == (3, 1, 5, 5) and samples.dtype == torch.float32
    assert (samples - x0).abs().max() < 1 / 255


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("num_steps", [3, 5, 18])
def test_every_evaluation_matches_diffusers_heun(num_steps, prediction):
    """Against diffusers' HeunDiscreteScheduler (Algorithm 1 with gamma = 0) fed our timesteps, the same
    network and x_T / sqrt(abar_{T-1}): every network input and the result agree. diffusers keeps its
    sigmas in float32; they are replaced by the same float64 sqrt((1 - abar) / abar) at our timesteps
    (its own formula), in its layout [s_0, s_1, s_1, ..., s_{S-1}, s_{S-1}, 0]. Both compute in float32
    in different orders; Heun's correction multiplies those differences by about h / sigma_{i+1}
    (590 for the last Heun step at S = 3, where they differ by 3e-5; 16000 at S = 2, left out)."""
    diffusers = pytest.importorskip("diffusers")
    d = make(prediction)
    model = ConvModel(seed=3)
    noise = torch.randn(2, 1, 6, 6, generator=seeded(0))
    inputs = []

    def recording(x, t):
        inputs.append(x.clone())
        return model(x, t)

    final = d.edm_heun_sample_loop(recording, noise.shape, num_steps=num_steps, noise=noise, clip_denoised=False)
    steps = karras_timesteps(d.alphas_cumprod, num_steps)
    theirs = diffusers.HeunDiscreteScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4,
                                             beta_end=0.02, prediction_type={"eps": "epsilon", "v": "v_prediction"}[
                                                 prediction])
    theirs.set_timesteps(timesteps=steps.tolist())
    sigma = torch.from_numpy(np.append(chain_sigmas(d)[steps], 0.0))
    theirs.sigmas = torch.cat([sigma[:1], sigma[1:-1].repeat_interleave(2), sigma[-1:]])
    x = noise / math.sqrt(d.alphas_cumprod[-1])
    expected = []
    for t in theirs.timesteps:
        model_input = theirs.scale_model_input(x, t)
        expected.append(model_input)
        x = theirs.step(model(model_input, torch.full((2,), int(t))), t, x).prev_sample
    assert [int(t) for t in theirs.timesteps] == [steps[0], *np.repeat(steps[1:], 2)]
    for got, want in zip([*inputs, final], [*expected, x], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- cost, registry, wiring
@pytest.mark.parametrize("num_steps", [1, 2, 7])
def test_counts_evaluations_and_visits_the_levels(num_steps):
    d = make(num_timesteps=30, schedule="cosine")
    model, calls, progress = ConvModel(), [], []

    def counting(x, t):
        assert t.dtype == torch.int64 and t.shape == (2,)
        calls.append(int(t[0]))
        return model(x, t)

    d.edm_heun_sample_loop(counting, (2, 1, 4, 4), num_steps=num_steps, progress=lambda i, n: progress.append((i, n)))
    steps = karras_timesteps(d.alphas_cumprod, num_steps).tolist()
    # each step calls at its level and (Heun's correction) at the next; the last step, to sigma = 0, once
    assert calls == [t for i in range(num_steps - 1) for t in (steps[i], steps[i + 1])] + [steps[-1]]
    assert len(calls) == 2 * num_steps - 1 == d.network_evaluations("edm_heun", num_steps)
    assert SamplerSettings("edm_heun", num_steps).network_evaluations(30) == 2 * num_steps - 1
    assert progress == [(i, num_steps) for i in range(num_steps)]


def test_registry_settings_and_generate():
    spec = SAMPLERS["edm_heun"]
    assert "edm_heun" in get_args(SamplerName)
    assert (spec.method, spec.parameters, spec.default_num_steps) == ("edm_heun_sample_loop", ("num_steps",), 18)
    assert spec.cost(18, 0, 1000) == 35
    # the registry's default S (requests, the GaussianDiffusion method); SamplerSettings' own is shared
    assert SamplerSettings("edm_heun", 18).params() == {"sampler": "edm_heun", "num_steps": 18, "clip_denoised": True}
    calls = []
    make(num_timesteps=30).edm_heun_sample_loop(lambda x, t: calls.append(t) or x, (1, 1, 2, 2))
    assert len(calls) == 35
    with pytest.raises(ValueError, match=r"num_steps=31 must be an integer in \[1, 30\]"):
        SamplerSettings("edm_heun", 31).network_evaluations(30)
    d = make("v", num_timesteps=30, variance="learned_range")
    model = ConvModel(1, 2)
    x = generate(d, model, (3, 1, 4, 4), SamplerSettings("edm_heun", 6), seeded_generator(5))
    torch.testing.assert_close(x, d.edm_heun_sample_loop(model, (3, 1, 4, 4), num_steps=6, generator=seeded(5)),
                               rtol=0, atol=0)
    assert x.abs().max() <= 1.0  # clip_denoised: the last step returns the clamped x0_hat
    assert (generate(d, model, (3, 1, 4, 4), SamplerSettings("edm_heun", 7), seeded_generator(5)) - x).abs().max() > 1e-3


def test_serve_request_takes_the_sampler():
    request = parse_json_model(SampleRequest, b'{"sampler": "edm_heun", "num_steps": 10}')
    assert (request.sampler, request.num_steps, request.sampler_parameters()) == ("edm_heun", 10, {})
    with pytest.raises(RequestError) as info:
        parse_json_model(SampleRequest, b'{"sampler": "edm_heun", "spacing": "logsnr"}')
    assert info.value.field == "spacing"
    assert resolve_num_steps("edm_heun", None, 1000, 1000) == 18 and resolve_num_steps("edm_heun", None, 8, 100) == 8


def test_same_seed_same_images_and_row_generators():
    d = make(num_timesteps=30, schedule="cosine", variance="learned_range")
    model = ConvModel(1, 2)
    a = d.edm_heun_sample_loop(model, (3, 1, 4, 4), num_steps=6, generator=seeded(0))
    b = d.edm_heun_sample_loop(model, (3, 1, 4, 4), num_steps=6, generator=seeded(0))
    c = d.edm_heun_sample_loop(model, (3, 1, 4, 4), num_steps=6, generator=seeded(1))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
    seeds, sizes = (11, 5, 7), (2, 1, 3)
    together = d.edm_heun_sample_loop(model, (6, 1, 4, 4), num_steps=6, generator=RowGenerators.from_seeds(seeds, sizes))
    alone = torch.cat([d.edm_heun_sample_loop(model, (size, 1, 4, 4), num_steps=6, generator=seeded(seed))
                       for seed, size in zip(seeds, sizes)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_classifier_free_guidance_wraps_the_model():
    d = make(num_timesteps=200)
    noise = torch.randn(6, 1, 4, 4, generator=seeded(2))
    # s = 1 with every label 0: class 0's own Gaussian, i.e. the single-Gaussian denoiser
    model = ExactClassGaussians(d)
    guided = classifier_free_guidance(model, torch.zeros(6, dtype=torch.long), 1.0, d.process)
    x = d.edm_heun_sample_loop(guided, noise.shape, num_steps=8, noise=noise, clip_denoised=False)
    plain = d.edm_heun_sample_loop(GaussianDenoiser(d), noise.shape, num_steps=8, noise=noise, clip_denoised=False)
    torch.testing.assert_close(x, plain, rtol=1e-5, atol=1e-5)
    assert model.batch_sizes == [6] * 15
    # s = 2 through generate: one call on the doubled batch per evaluation, each image in its label's mode
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    model = ExactClassGaussians(d)
    x = generate(d, model, noise.shape, SamplerSettings("edm_heun", 8, clip_denoised=False), seeded_generator(3),
                 class_labels=labels, guidance_scale=2.0)
    assert model.batch_sizes == [12] * SamplerSettings("edm_heun", 8).network_evaluations(200)
    assert torch.equal((x.double().mean(dim=(1, 2, 3)) > 0), labels == 0)


def test_argument_errors():
    d, model, shape = make(num_timesteps=30, schedule="cosine"), ConvModel(), (2, 1, 4, 4)
    cases = [
        ({"num_steps": 0}, r"num_steps=0 must be an integer in \[1, 30\]"),
        ({"num_steps": 31}, r"num_steps=31 must be an integer in \[1, 30\]"),
        ({"num_steps": 2.5}, r"num_steps=2.5"),
        ({"num_steps": 4, "noise": torch.zeros(3, 1, 4, 4)}, r"noise has shape \(3, 1, 4, 4\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            d.edm_heun_sample_loop(model, shape, **kwargs)
    with pytest.raises(ValueError):
        d.edm_heun_sample_loop(ConvModel(1, 3), shape, num_steps=4)  # 3 output channels for 1
