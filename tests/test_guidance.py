"""Classifier-free guidance (diffusion_core.guidance) against exact answers.

The data are two Gaussian classes (``_class_gaussians``: N(+-MU, S^2 I), weights 0.7 / 0.3) whose
exact conditional and unconditional (mixture) denoisers are known in closed form. At guidance
scale s = 1 every sampler must draw each class's Gaussian, at s = 0 the mixture. The expected
moments are the sampler's own on a Gaussian (``_gaussian_chain``): the DPM-Solver++ ODE reaches the
target N(MU, S^4 abar_0 / sigma_0^2) up to its stated discretization error; the ancestral chain
(fixed_small) and PC follow their exact recursions; deterministic DDIM is linear on a Gaussian, so
its moments follow exactly from its steps (:func:`ddim_moments`). By the symmetry x -> -x of every
sampler, class -MU has the negated mean. Tolerances come from the sample size: 5 standard errors
of the mean, of the sample variance (sqrt(2 / n) relative) and of the class fraction
(sqrt(p (1 - p) / n)).

One guided evaluation is checked against diffusers' ``ClassifierFreeGuidance`` guider and the
formula of its DiT pipeline, on the same network outputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _class_gaussians import WEIGHTS, ExactClassGaussians
from _diffusion_helpers import single_thread  # noqa: F401 (autouse fixture)
from _gaussian_chain import MU, Moments, S, pc_moments, target

from diffusion_core import DiffusionConfig, GaussianDiffusion
from diffusion_core.generate import SamplerSettings, generate, guided_network_evaluations
from diffusion_core.guidance import (
    NO_LABEL,
    check_guidance_interval,
    classifier_free_guidance,
    guidance_evaluations,
    guide_outputs,
    guided_timesteps,
    with_class_labels,
)
from diffusion_core.timesteps import sampling_timesteps

T = 200
N = 2048
SHAPE = (N, 1, 8, 8)
PIXELS = 64
LABELS = torch.arange(N) % 2  # classes 0 and 1 alternating


def make(prediction: str = "eps", variance: str = "fixed_small") -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(num_timesteps=T, prediction=prediction, variance=variance))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ddim_moments(d: GaussianDiffusion, num_steps: int) -> Moments:
    """Deterministic DDIM (uniform steps) from x_T ~ N(0, I) on N(MU, S^2) data, exactly: with
    w = x - sqrt(abar_t) MU the exact x0_hat is MU + g_t w (g_t = S^2 sqrt(abar_t) / sigma_t^2) and
    eps_hat = sqrt(1 - abar_t) w / sigma_t^2, so a step to abar_prev (1 at the end) maps w to
    (sqrt(abar_prev) g_t + sqrt(1 - abar_prev) sqrt(1 - abar_t) / sigma_t^2) w."""
    steps = [int(s) for s in sampling_timesteps(d.alphas_cumprod, num_steps, "uniform")]
    abar = d.alphas_cumprod
    offset, variance = -math.sqrt(abar[steps[0]]) * MU, 1.0
    for i, t in enumerate(steps):
        abar_prev = abar[steps[i + 1]] if i + 1 < len(steps) else 1.0
        sigma2 = abar[t] * S**2 + 1 - abar[t]
        gain = math.sqrt(abar_prev) * S**2 * math.sqrt(abar[t]) / sigma2 + math.sqrt(
            (1 - abar_prev) * (1 - abar[t])) / sigma2
        offset, variance = gain * offset, gain**2 * variance
    return Moments(MU + offset, variance)


def check_moments(x: torch.Tensor, expected: Moments, variance_allowance: float = 0.0) -> None:
    """Mean within 5 s.e. of ``expected.mean``; variance within 5 s.e. (sqrt(2 / n) relative) plus
    ``variance_allowance`` (relative); n = all pixels of ``x`` (independent given the class)."""
    n, values = x.numel(), x.double()
    mean, var = values.mean().item(), values.var().item()
    assert abs(mean - expected.mean) < 5 * math.sqrt(expected.variance / n), (mean, expected)
    assert abs(var / expected.variance - 1) < 5 * math.sqrt(2 / n) + variance_allowance, (var, expected)


def negated(m: Moments) -> Moments:
    return Moments(-m.mean, m.variance)


# sampler name -> (run(diffusion, model, generator), expected moments of class +MU, variance allowance)
SAMPLERS = {
    "ancestral": (lambda d, m, g: d.p_sample_loop(m, SHAPE, generator=g, clip_denoised=False),
                  lambda d: pc_moments(d, corrector_steps=0, snr=0.16, pixels=PIXELS), 0.0),
    "ddim": (lambda d, m, g: d.ddim_sample_loop(m, SHAPE, num_steps=50, eta=0.0, generator=g, clip_denoised=False),
             lambda d: ddim_moments(d, 50), 0.0),
    # the ODE solved with 50 second-order steps: discretization error of the variance below 2%
    "dpm_solver": (lambda d, m, g: d.dpm_solver_sample_loop(m, SHAPE, num_steps=50, generator=g,
                                                            clip_denoised=False),
                   target, 0.02),
    "pc": (lambda d, m, g: d.pc_sample_loop(m, SHAPE, corrector_steps=1, snr=0.16, generator=g,
                                            clip_denoised=False),
           lambda d: pc_moments(d, corrector_steps=1, snr=0.16, pixels=PIXELS), 0.0),
}


def test_ddim_recursion_is_the_sampler_on_one_gaussian():
    # the expected DDIM moments on the test's own terms: the class model at s = 1 with one label
    # is the single Gaussian N(MU, S^2 I)
    d = make()
    guided = classifier_free_guidance(ExactClassGaussians(d), torch.zeros(N, dtype=torch.long), 1.0, d.process)
    x = SAMPLERS["ddim"][0](d, guided, seeded(9))
    check_moments(x, ddim_moments(d, 50))
    # DDIM's 50 steps under-disperse visibly: the recursion is not just the target
    assert ddim_moments(d, 50).variance / target(d).variance - 1 < -0.15


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_scale_one_draws_each_class_gaussian(sampler):
    run, expected_of, allowance = SAMPLERS[sampler]
    d = make()
    model = ExactClassGaussians(d)
    x = run(d, classifier_free_guidance(model, LABELS, 1.0, d.process), seeded(1))
    expected = expected_of(d)
    check_moments(x[LABELS == 0], expected, allowance)
    check_moments(x[LABELS == 1], negated(expected), allowance)
    # the pixels of one class's images are uncorrelated: covariance matrix [64, 64] off its diagonal
    # within 5 s.e. (variance / sqrt(n) for independent pixels)
    images = x[LABELS == 0].double().flatten(1)
    cov = torch.cov(images.T)
    off = cov - torch.diag(torch.diagonal(cov))
    assert off.abs().max().item() < 5 * expected.variance / math.sqrt(images.shape[0])
    assert model.batch_sizes == [N] * model.calls  # s = 1: one plain call per step


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_scale_zero_draws_the_mixture(sampler):
    run, expected_of, allowance = SAMPLERS[sampler]
    d = make()
    model = ExactClassGaussians(d)
    x = run(d, classifier_free_guidance(model, LABELS, 0.0, d.process), seeded(2))
    # the labels are ignored: each image falls in mode +MU with probability WEIGHTS[0] (the two
    # modes are 12 standard deviations apart, so the sign of the image mean tells them apart)
    mode0 = x.double().mean(dim=(1, 2, 3)) > 0
    fraction = mode0.double().mean().item()
    assert abs(fraction - WEIGHTS[0]) < 5 * math.sqrt(WEIGHTS[0] * WEIGHTS[1] / N), fraction
    # within a mode, the class's Gaussian
    expected = expected_of(d)
    check_moments(x[mode0], expected, allowance)
    check_moments(x[~mode0], negated(expected), allowance)
    assert model.batch_sizes == [N] * model.calls


def test_guidance_sharpens_towards_the_asked_class():
    # s = 3 on a mixed batch: every image lands in the mode of its label (at s = 0 only 70% / 30%)
    d = make()
    x = SAMPLERS["dpm_solver"][0](d, classifier_free_guidance(ExactClassGaussians(d), LABELS, 3.0, d.process),
                                  seeded(3))
    in_mode = (x.double().mean(dim=(1, 2, 3)) > 0) == (LABELS == 0)
    assert in_mode.all()


def test_generate_with_labels_is_the_guided_sampler():
    d = make()
    labels = torch.tensor([0, 1, NO_LABEL, 1])
    settings = SamplerSettings("ddim", 10)
    for scale in (0.0, 1.0, 2.5):
        model = ExactClassGaussians(d)
        got = generate(d, model, (4, 1, 8, 8), settings, seeded(4), class_labels=labels, guidance_scale=scale)
        want = d.ddim_sample_loop(classifier_free_guidance(ExactClassGaussians(d), labels, scale, d.process),
                                  (4, 1, 8, 8), num_steps=10, generator=seeded(4))
        assert torch.equal(got, want)
        # each sampler step is one network call, on the doubled batch when guiding
        assert model.calls == settings.network_evaluations(T)
        assert model.batch_sizes == [4 * guidance_evaluations(scale)] * model.calls


# ------------------------------------------------------------------ one guided evaluation


def _inputs(d: GaussianDiffusion, n: int = 6, seed: int = 0):
    g = seeded(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, d.num_timesteps, (n,), generator=g)
    return x, t


@pytest.mark.parametrize("scale", [0.5, 2.0, 7.5])
def test_one_step_equals_diffusers_classifier_free_guidance(scale):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.guiders import ClassifierFreeGuidance

    d = make()
    model = ExactClassGaussians(d)
    x, t = _inputs(d)
    labels = torch.tensor([0, 1, 1, 0, 0, 1])
    pred_cond, pred_uncond = model(x, t, labels), model(x, t, torch.full_like(labels, NO_LABEL))
    guider = ClassifierFreeGuidance(guidance_scale=scale)
    want = guider.forward(pred_cond=pred_cond, pred_uncond=pred_uncond).pred
    got = classifier_free_guidance(model, labels, scale, d.process)(x, t)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the formula diffusers' DiT pipeline writes out: uncond_eps + guidance_scale * (cond_eps - uncond_eps)
    torch.testing.assert_close(got, pred_uncond + scale * (pred_cond - pred_uncond), rtol=1e-12, atol=1e-12)
    assert diffusers.__version__  # the peer checked is the installed diffusers
    # diffusers counts the same conditions: one at s = 1, two otherwise
    assert guider.num_conditions == guidance_evaluations(scale) == 2
    assert ClassifierFreeGuidance(guidance_scale=1.0).num_conditions == guidance_evaluations(1.0) == 1


def test_doubled_batch_is_one_network_call_conditional_rows_first():
    d = make()
    model = ExactClassGaussians(d)
    x, t = _inputs(d, n=4)
    seen = []

    def recording(x_t, t_, y):
        seen.append((x_t.clone(), t_.clone(), y.clone()))
        return model(x_t, t_, y)

    labels = torch.tensor([1, 0, NO_LABEL, 1])
    classifier_free_guidance(recording, labels, 2.0, d.process)(x, t)
    assert len(seen) == 1
    x2, t2, y2 = seen[0]
    assert torch.equal(x2, torch.cat([x, x])) and torch.equal(t2, torch.cat([t, t]))
    assert y2.tolist() == [1, 0, -1, 1, -1, -1, -1, -1]
    for scale, label_row in ((1.0, [1, 0, -1, 1]), (0.0, [-1, -1, -1, -1])):
        seen.clear()
        classifier_free_guidance(recording, labels, scale, d.process)(x, t)
        assert len(seen) == 1 and seen[0][2].tolist() == label_row and seen[0][0].shape[0] == 4


def test_no_label_rows_get_the_unconditional_output_at_any_scale():
    d = make()
    model = ExactClassGaussians(d)
    x, t = _inputs(d)
    labels = torch.tensor([0, NO_LABEL, 1, NO_LABEL, 0, 1])
    uncond = model(x, t, torch.full_like(labels, NO_LABEL))
    cond = model(x, t, labels)
    for scale in (0.0, 0.3, 1.0, 4.0):
        out = classifier_free_guidance(model, labels, scale, d.process)(x, t)
        assert torch.equal(out[labels == NO_LABEL], uncond[labels == NO_LABEL])
    assert torch.equal(classifier_free_guidance(model, labels, 1.0, d.process)(x, t), cond)
    assert torch.equal(classifier_free_guidance(model, labels, 0.0, d.process)(x, t), uncond)


@pytest.mark.parametrize("prediction", ["x_start", "v", "score"])
def test_other_predictions_are_guided_in_eps(prediction):
    # the same data and scale: guiding an x_start / v / score network equals guiding the eps network
    # and converting its guided eps, and s = 1 / s = 0 give back the conditional / unconditional output
    d_eps, d = make("eps"), make(prediction)
    x, t = _inputs(d)
    t = t.clamp(min=1)  # x_start -> eps divides by sqrt(1/abar - 1), 0.01 at t = 0: keep float64 roundoff small
    labels = torch.tensor([0, 1, 1, 0, NO_LABEL, 1])
    model, model_eps = ExactClassGaussians(d), ExactClassGaussians(d_eps)
    for scale in (0.0, 0.5, 1.0, 3.0):
        got = classifier_free_guidance(model, labels, scale, d.process)(x, t)
        want = d.output_from_eps(x, t, classifier_free_guidance(model_eps, labels, scale, d_eps.process)(x, t))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    cond, uncond = model(x, t, labels), model(x, t, torch.full_like(labels, NO_LABEL))
    torch.testing.assert_close(guide_outputs(cond, uncond, x, t, 1.0, d.process), cond, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(guide_outputs(cond, uncond, x, t, 0.0, d.process), uncond, rtol=1e-9, atol=1e-9)


def test_learned_range_variance_comes_from_the_conditional_half():
    d = make(variance="learned_range")

    def model(x_t, t, y):
        eps = x_t * (1.0 + y.double().reshape(-1, 1, 1, 1))
        variance = torch.ones_like(x_t) * (y.double().reshape(-1, 1, 1, 1) / 10)
        return torch.cat([eps, variance], dim=1)

    x, t = _inputs(d, n=3)
    labels = torch.tensor([0, 1, NO_LABEL])
    out = classifier_free_guidance(model, labels, 2.0, d.process)(x, t)
    assert out.shape == (3, 2, 8, 8)
    cond, uncond = model(x, t, labels), model(x, t, torch.full_like(labels, NO_LABEL))
    torch.testing.assert_close(out[:, 1:], cond[:, 1:])  # GLIDE: variance of the conditional half
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + 2.0 * (cond[:, :1] - uncond[:, :1]))
    # and the guided output is a valid model output for the samplers
    assert d.p_mean_variance(classifier_free_guidance(model, labels, 2.0, d.process), x, t)["variance"].shape == x.shape


# ------------------------------------------------------------------ errors and costs


@pytest.mark.parametrize("scale", [-0.5, float("nan"), float("inf"), "2", True, None])
def test_bad_guidance_scale_raises_naming_it(scale):
    d = make()
    with pytest.raises(ValueError, match="guidance_scale"):
        classifier_free_guidance(ExactClassGaussians(d), LABELS[:2], scale, d.process)
    with pytest.raises(ValueError, match="guidance_scale"):
        guidance_evaluations(scale)


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([0, -2]), r"class_labels has the value -2; labels must be in \[-1, num_classes\)"),
    (torch.tensor([[0, 1]]), r"class_labels must have shape \[N\]"),
    (torch.tensor([0.0, 1.0]), "class_labels must be an integer"),
    ([0, "a"], "class_labels"),
])
def test_bad_labels_raise_naming_class_labels(labels, match):
    d = make()
    with pytest.raises((ValueError, TypeError), match=match):
        classifier_free_guidance(ExactClassGaussians(d), labels, 2.0, d.process)


def test_label_count_is_checked_against_the_batch_at_call_time():
    d = make()
    x, t = _inputs(d, n=3)
    for scale in (0.0, 1.0, 2.0):
        guided = classifier_free_guidance(ExactClassGaussians(d), [0, 1], scale, d.process)
        with pytest.raises(ValueError, match="class_labels has shape"):
            guided(x, t)
    with pytest.raises(ValueError, match="class_labels has shape"):
        with_class_labels(ExactClassGaussians(d), [0, 1])(x, t)


def test_guidance_evaluations():
    assert [guidance_evaluations(s) for s in (0, 0.0, 1, 1.0, 0.5, 1.5, 3, 100.0)] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert guidance_evaluations(np.float32(2.0)) == 2


def test_labels_follow_the_input_device_and_sequences_are_accepted():
    d = make()
    x, t = _inputs(d, n=2)
    model = ExactClassGaussians(d)
    got = classifier_free_guidance(model, [1, 0], 2.0, d.process)(x, t)
    want = classifier_free_guidance(model, torch.tensor([1, 0]), 2.0, d.process)(x, t)
    assert torch.equal(got, want)


# ------------------------------------------------------------------ guidance interval (Kynkaanniemi et al. 2024)


def test_guided_timesteps_are_those_whose_sigma_is_in_the_interval():
    """Oracle: sigma_t = sqrt(1 / abar_t - 1) computed here from the schedule, compared with the bounds."""
    d = make()
    sigma = np.sqrt(1.0 / d.alphas_cumprod - 1.0)
    inside = guided_timesteps(d.process, (0.5, 2.0))
    assert inside.dtype == bool and inside.shape == (T,)
    assert np.array_equal(inside, (sigma > 0.5) & (sigma <= 2.0))
    assert 0 < inside.sum() < T  # the interval cuts the chain at both ends
    first, last = np.flatnonzero(inside)[[0, -1]]
    assert sigma[first - 1] <= 0.5 < sigma[first] and sigma[last] <= 2.0 < sigma[last + 1]
    assert guided_timesteps(d.process, None).all() and guided_timesteps(d.process, (0.0, math.inf)).all()


def test_interval_guides_rows_inside_and_leaves_the_conditional_output_outside():
    """Oracle: the plain guided output (no interval) inside and the s = 1 output outside, row by row;
    a call with no row inside is one conditional call of N images."""
    d = make()
    model = ExactClassGaussians(d)
    inside = guided_timesteps(d.process, (0.5, 2.0))
    t_in, t_out = int(np.flatnonzero(inside)[0]), int(np.flatnonzero(~inside)[-1])
    x, _ = _inputs(d)
    t = torch.tensor([t_in, t_out, t_in, t_out, t_in, t_out])
    labels = torch.tensor([0, 1, 1, 0, NO_LABEL, NO_LABEL])
    got = classifier_free_guidance(model, labels, 3.0, d.process, guidance_interval=(0.5, 2.0))(x, t)
    everywhere = classifier_free_guidance(model, labels, 3.0, d.process)(x, t)
    conditional = model(x, t, labels)
    rows_in = torch.from_numpy(inside)[t]
    assert torch.equal(got[rows_in], everywhere[rows_in]) and torch.equal(got[~rows_in], conditional[~rows_in])
    assert not torch.equal(everywhere[~rows_in][:2], conditional[~rows_in][:2])  # guidance does change them
    seen = []

    def recording(x_t, t_, y):
        seen.append(x_t.shape[0])
        return model(x_t, t_, y)

    outside = classifier_free_guidance(recording, labels, 3.0, d.process, guidance_interval=(0.5, 2.0))
    assert torch.equal(outside(x, torch.full_like(t, t_out)), model(x, torch.full_like(t, t_out), labels))
    outside(x, torch.full_like(t, t_in))
    assert seen == [6, 12]  # 1 evaluation per image outside the interval, 2 inside


def test_interval_covering_every_level_is_plain_guidance_in_a_sampler():
    """Oracle: the sampler without an interval (same seed), and with an empty-at-every-step interval
    the s = 1 sampler, exactly."""
    d = make()
    model = ExactClassGaussians(d)
    labels = LABELS[:64]
    settings = SamplerSettings("dpm_solver", 10, algorithm="sde-dpmsolver++", spacing="quadratic")
    shape = (64, 1, 8, 8)

    def draw(**kwargs):
        return generate(d, model, shape, settings, generator=seeded(5), class_labels=labels, **kwargs)

    assert torch.equal(draw(guidance_scale=2.0, guidance_interval=(0.0, math.inf)), draw(guidance_scale=2.0))
    above_every_level = (float(d.process.sqrt_recipm1_alphas_cumprod.max()) + 1.0, math.inf)
    assert torch.equal(draw(guidance_scale=2.0, guidance_interval=above_every_level), draw(guidance_scale=1.0))


@pytest.mark.parametrize("interval", [(1.0, 0.5), (-0.1, 1.0), (math.inf, math.inf), (0.1, math.nan),
                                      (0.1,), (0.1, 0.2, 0.3), "ab", (True, 2.0), None])
def test_bad_guidance_interval_raises_naming_it(interval):
    d = make()
    if interval is None:  # None is "guide every step", not an error
        classifier_free_guidance(ExactClassGaussians(d), LABELS[:2], 2.0, d.process, guidance_interval=None)
        return
    with pytest.raises(ValueError, match="guidance_interval"):
        classifier_free_guidance(ExactClassGaussians(d), LABELS[:2], 2.0, d.process, guidance_interval=interval)
    with pytest.raises(ValueError, match="guidance_interval"):
        check_guidance_interval(interval)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "pc", "langevin", "dpm_solver", "edm_heun"])
def test_guided_evaluations_are_the_images_the_network_sees(sampler):
    """Oracle: the images the exact two-class network is handed in a real guided run (a doubled batch
    counts 2 per image), and for plain guidance twice the sampler's registry cost."""
    d = make()
    settings = SamplerSettings(sampler, 12, spacing="quadratic", corrector_steps=1)
    interval = (0.5, 2.0)
    model = ExactClassGaussians(d)
    generate(d, model, (1, 1, 8, 8), settings, generator=seeded(0), class_labels=[1], guidance_scale=2.0,
             guidance_interval=interval)
    counted = guided_network_evaluations(d, settings, 2.0, interval)
    assert counted == sum(model.batch_sizes)
    plain = settings.network_evaluations(T)
    assert plain < counted < 2 * plain  # the interval cuts the chain at both ends
    assert guided_network_evaluations(d, settings, 2.0) == 2 * plain
    assert guided_network_evaluations(d, settings, 1.0, interval) == plain


def test_guided_evaluations_of_the_dpm_solver_count_its_steps_in_the_interval():
    """Oracle: one evaluation per step plus one at each visited timestep (``sampling_timesteps``)
    whose sigma_t = sqrt(1 / abar_t - 1) is in the interval, computed here from the schedule."""
    d = make()
    sigma = np.sqrt(1.0 / d.alphas_cumprod - 1.0)
    for steps in (6, 14, 20):
        visited = sampling_timesteps(d.alphas_cumprod, steps, "quadratic")
        want = steps + int(sum(0.5 < sigma[t] <= 2.0 for t in visited))
        settings = SamplerSettings("dpm_solver", steps, spacing="quadratic")
        assert guided_network_evaluations(d, settings, 3.0, (0.5, 2.0)) == want
    with pytest.raises(ValueError, match="guidance_interval"):
        guided_network_evaluations(d, settings, 3.0, (2.0, 0.5))
