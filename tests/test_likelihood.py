"""normal_kl, the normal CDFs, the discretized Gaussian decoder likelihood, and the bound:
prior term, calc_bpd_loop structure and the stratified estimate calc_bpd_estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _diffusion_helpers import (
    ConvModel,
    CountingModel,
    grid_images,
    single_thread,  # noqa: F401 (autouse fixture)
)

from diffusion_core import DiffusionConfig, GaussianDiffusion, bound
from diffusion_core.bound import strata_bounds
from diffusion_core.likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
    standard_normal_cdf,
)

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0


def phi(x: float) -> float:
    """Standard normal CDF from the standard library (erfc keeps the lower tail accurate)."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def reference_log_prob(x: float, mean: float, log_scale: float) -> float:
    """Discretized Gaussian log-probability of one pixel, written out with math.erfc in float64."""
    sigma, w = math.exp(log_scale), 1.0 / 255.0
    if x < -0.999:
        p = phi((x + w - mean) / sigma)
    elif x > 0.999:
        p = phi(-(x - w - mean) / sigma)
    else:
        a, b = (x - w - mean) / sigma, (x + w - mean) / sigma
        if a > 0:  # mirror into the lower tail
            a, b = -b, -a
        p = phi(b) - phi(a)
    return math.log(p) if p > 0 else -math.inf  # float64 underflow: excluded by the caller


# ---------------------------------------------------------------- normal_kl and CDFs
def test_normal_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-12)
    assert torch.all(normal_kl(m1, lv1, m1, lv1) == 0)
    assert torch.allclose(normal_kl(m1, lv1, 0.0, 0.0), 0.5 * (-1 - lv1 + lv1.exp() + m1**2))
    with pytest.raises(TypeError, match="at least one torch.Tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_cdfs():
    x = torch.linspace(-9, 9, 20001, dtype=torch.float64)
    exact = standard_normal_cdf(x)
    reference = torch.tensor([phi(v) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(exact, reference, rtol=1e-12, atol=1e-300)
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 2e-4


# ---------------------------------------------------------------- discretized Gaussian
def test_discretized_likelihood_matches_reference_and_normalizes():
    g = torch.Generator().manual_seed(0)
    x = GRID.repeat(8)
    means = torch.rand(x.shape, generator=g, dtype=torch.float64) * 2.4 - 1.2
    log_scales = torch.rand(x.shape, generator=g, dtype=torch.float64) * 7 - 7  # sigma in [1e-3, 1]
    got = discretized_gaussian_log_likelihood(x, means, log_scales)
    ref = torch.tensor(
        [reference_log_prob(*v) for v in zip(x.tolist(), means.tolist(), log_scales.tolist())], dtype=torch.float64
    )
    finite = ref > -700  # the float64 reference turns subnormal (imprecise) and then underflows beyond
    assert finite.float().mean() > 0.5
    assert torch.allclose(got[finite], ref[finite], rtol=1e-9, atol=1e-9)
    assert torch.all(torch.isfinite(got)) and torch.all(got <= 0)
    # float32 inputs agree with the float64 result to float32 precision
    got32 = discretized_gaussian_log_likelihood(x.float(), means.float(), log_scales.float()).double()
    assert torch.all(((got32 - got).abs() / got.abs().clamp(min=1.0)) < 1e-4)
    # the 256 bins (open-ended at -1 and +1) are a probability distribution
    for mean, log_scale in [(0.3, -4.0), (-0.99, -1.0), (1.5, 0.5), (0.0, -6.0)]:
        probs = discretized_gaussian_log_likelihood(
            GRID, torch.full_like(GRID, mean), torch.full_like(GRID, log_scale)
        ).exp()
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_tanh_variant_is_close():
    g = torch.Generator().manual_seed(1)
    x = GRID.repeat(20)
    means = torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1
    log_scales = torch.rand(x.shape, generator=g, dtype=torch.float64) * 5 - 5
    exact = discretized_gaussian_log_likelihood(x, means, log_scales).exp()
    tanh = discretized_gaussian_log_likelihood(x, means, log_scales, cdf="tanh").exp()
    # a bin probability is a difference of two CDFs, each within 2e-4 of the exact one
    assert (exact - tanh).abs().max() < 4e-4


def test_discretized_likelihood_far_tails_are_finite_with_gradients():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5], dtype=torch.float32)
    means = torch.tensor([0.9, -0.9, -0.9, 0.5], requires_grad=True)
    log_scales = torch.tensor([-8.0, -8.0, -8.0, 3.0], requires_grad=True)
    log_p = discretized_gaussian_log_likelihood(x, means, log_scales)
    assert torch.all(torch.isfinite(log_p)) and torch.all(log_p[:3] < -1e4)  # not stuck at log(1e-12)
    log_p.sum().backward()
    assert torch.all(torch.isfinite(means.grad)) and torch.all(torch.isfinite(log_scales.grad))
    with pytest.raises(ValueError, match="cdf='erf'"):
        discretized_gaussian_log_likelihood(x, means, log_scales, cdf="erf")
    with pytest.raises(ValueError, match="must broadcast"):
        discretized_gaussian_log_likelihood(x, means[:2], log_scales)


# ---------------------------------------------------------------- the bound
def test_prior_bpd_by_hand():
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=100, schedule="cosine"))
    x0 = grid_images((2, 3, 4, 4))
    abar = float(np.prod(1 - d.betas))
    x = x0.double().numpy().reshape(2, -1)
    kl_nats = 0.5 * (-math.log(1 - abar) + (1 - abar) + abar * x**2 - 1)
    expected = kl_nats.mean(axis=1) / math.log(2)
    assert np.allclose(bound.prior_bpd(d.process, x0).numpy(), expected, rtol=1e-4, atol=1e-9)


def test_calc_bpd_loop_structure_and_batching():
    num_t = 30
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=num_t, schedule="cosine", variance="learned_range"))
    model = CountingModel(ConvModel(1, 2))
    x0 = grid_images((3, 1, 5, 5))
    steps = []
    out = d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(0),
                          progress=lambda i, n: steps.append((i, n)))
    assert out["total_bpd"].shape == out["prior_bpd"].shape == (3,)
    for key in ("vb", "xstart_mse", "mse"):
        assert out[key].shape == (3, num_t) and torch.all(torch.isfinite(out[key])), key
    assert torch.allclose(out["total_bpd"], out["vb"].double().sum(1).float() + out["prior_bpd"])
    assert len(model.calls) == num_t  # one network call per timestep, all images at once
    assert sorted(int(t[0]) for t in model.calls) == list(range(num_t))
    assert all(t.shape == (3,) and torch.all(t == t[0]) for t in model.calls)
    assert steps == [(i, num_t) for i in range(num_t)]
    again = d.calc_bpd_loop(model.model, x0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["vb"], out["vb"])
    # column 0 is the decoder term L_0 = -log p(x_0 | x_1): check it against the direct formula
    g = torch.Generator().manual_seed(0)
    for _ in range(num_t - 1):  # replay the noise draws of t = T-1 .. 1
        torch.randn(x0.shape, generator=g)
    x1 = d.q_sample(x0, torch.zeros(3, dtype=torch.long), torch.randn(x0.shape, generator=g))
    pmv = d.p_mean_variance(model.model, x1, torch.zeros(3, dtype=torch.long))
    nll = -discretized_gaussian_log_likelihood(x0, pmv["mean"], 0.5 * pmv["log_variance"]).mean((1, 2, 3)) / math.log(2)
    assert torch.allclose(out["vb"][:, 0], nll, rtol=1e-5)


def _estimate_vs_exact(d, model, x0, replicas, num_samples):
    batch = x0.expand(replicas, -1, -1, -1).contiguous()
    counting = CountingModel(model)
    est = d.calc_bpd_estimate(counting, batch, num_samples=num_samples, generator=torch.Generator().manual_seed(1))
    assert len(counting.calls) == num_samples and est["num_samples"] == num_samples
    exact_batch = batch[: replicas // 3]  # the exact bound varies only through the noise: fewer copies do
    exact = d.calc_bpd_loop(model, exact_batch, generator=torch.Generator().manual_seed(2))["total_bpd"].double()
    values = est["total_bpd"].double()
    se_mean = math.sqrt(values.var().item() / replicas + exact.var().item() / len(exact_batch))
    assert abs(values.mean().item() - exact.mean().item()) < 4 * se_mean, (values.mean(), exact.mean(), se_mean)
    assert torch.allclose(est["prior_bpd"], bound.prior_bpd(d.process, batch))
    # the reported standard error matches the spread of independent estimates
    ratio = math.sqrt((est["stderr"].double() ** 2).mean().item() / values.var().item())
    assert 0.7 < ratio < 1.4, ratio
    return est


def test_calc_bpd_estimate_is_unbiased_with_honest_stderr():
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=64, variance="fixed_large"))
    x0 = grid_images((1, 1, 4, 4), seed=4)
    est = _estimate_vs_exact(d, ConvModel(1, 1, seed=3), x0, replicas=600, num_samples=8)
    assert torch.all(est["stderr"] > 0)


def test_calc_bpd_estimate_odd_k_and_learned_variance():
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=40, schedule="cosine", variance="learned_range"))
    x0 = grid_images((1, 1, 4, 4), seed=5)
    _estimate_vs_exact(d, ConvModel(1, 2, seed=6), x0, replicas=600, num_samples=7)


def test_calc_bpd_estimate_errors_and_determinism():
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=25))
    model, x0 = ConvModel(), grid_images((2, 1, 4, 4))
    for bad in (1, 51, 2.5, True):
        with pytest.raises(ValueError, match=r"num_samples=.*must be an integer in \[2, 50\]"):
            d.calc_bpd_estimate(model, x0, num_samples=bad)
    a = d.calc_bpd_estimate(model, x0, num_samples=6, generator=torch.Generator().manual_seed(0))
    b = d.calc_bpd_estimate(model, x0, num_samples=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a["total_bpd"], b["total_bpd"]) and torch.equal(a["stderr"], b["stderr"])
    # with K = 2T every timestep is its own stratum, so only the noise is random
    full = d.calc_bpd_estimate(model, x0, num_samples=50, generator=torch.Generator().manual_seed(0))
    assert full["total_bpd"].shape == full["stderr"].shape == (2,)


@pytest.mark.parametrize("num_t,num_strata", [(1000, 8), (1000, 16), (64, 3), (64, 64), (10, 9), (5, 2), (1, 1)])
def test_strata_partition_the_timesteps_with_t0_alone(num_t, num_strata):
    bounds = strata_bounds(num_t, num_strata)
    assert bounds.dtype == np.int64 and len(bounds) == num_strata + 1
    assert bounds[0] == 0 and bounds[-1] == num_t and np.all(np.diff(bounds) >= 1)
    if num_strata >= 2:
        assert bounds[1] == 1  # the decoder term L_0 is its own stratum
        widths = np.diff(bounds)[1:]
        assert np.all(np.diff(widths) >= -1)  # the strata widen with t (up to rounding)


def test_strata_bounds_errors():
    for bad in (0, 11):
        with pytest.raises(ValueError, match="num_strata"):
            strata_bounds(10, bad)
