"""Importance sampling of timesteps (Nichol & Dhariwal 2021, sec. 3.3) against exact expectations,
a Monte Carlo check of the weighted objective, and the loss a training step backpropagates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import recording_backward

from diffusion_core.diffusion import GaussianDiffusion
from pipelines.training.config import load_config
from pipelines.training.example_noise import example_timesteps_and_noise
from pipelines.training.state import TrainState, load_train_state, save_train_state
from pipelines.training.step import train_step
from pipelines.training.timestep_sampler import LossSecondMomentSampler
from pipelines.training.trainee import build_trainee
from pipelines.training.worker import Worker

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
CPU = Worker(rank=0, world_size=1, device=torch.device("cpu"))


def _warm(sampler: LossSecondMomentSampler, scale: np.ndarray) -> None:
    for k in range(sampler.history):
        sampler.update(np.arange(sampler.num_timesteps), scale * (1 + 0.1 * k))


def test_uniform_until_every_timestep_has_its_history() -> None:
    sampler = LossSecondMomentSampler(4, history=3)
    np.testing.assert_array_equal(sampler.probabilities(), np.full(4, 0.25))
    sampler.update(np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]), np.ones(11))
    assert not sampler.warmed_up  # t = 3 has 2 of 3
    np.testing.assert_array_equal(sampler.probabilities(), np.full(4, 0.25))
    sampler.update(np.array([3]), np.ones(1))
    assert sampler.warmed_up


def test_probabilities_follow_the_root_mean_square_loss_mixed_with_uniform() -> None:
    sampler = LossSecondMomentSampler(4, history=10, uniform_prob=0.001)
    scale = np.array([1.0, 2.0, 4.0, 8.0])
    _warm(sampler, scale)
    rms = np.sqrt(np.mean((scale[:, None] * (1 + 0.1 * np.arange(10))[None, :]) ** 2, axis=1))
    expected = 0.999 * rms / rms.sum() + 0.001 / 4
    np.testing.assert_allclose(sampler.probabilities(), expected, rtol=1e-12)
    assert sampler.probabilities().sum() == pytest.approx(1.0)


def test_importance_weights_keep_the_objective_unbiased() -> None:
    """Monte Carlo: the mean of w_t L_t over t ~ p matches the mean of L_t over uniform t within
    4 standard errors, for per-example losses L_t = m_t * Exp(1) whose scales m_t span two orders of
    magnitude (the sampler warmed on the same distribution). Without the weights the estimate is
    sum_t p_t m_t, dozens of standard errors away; the check asserts that too, so it can fail."""
    rng = np.random.default_rng(0)
    scale = np.array([0.1, 1.0, 3.0, 0.5, 10.0])
    sampler = LossSecondMomentSampler(5, history=10)
    for _ in range(sampler.history):
        sampler.update(np.arange(5), scale * rng.exponential(size=5))
    p = sampler.probabilities()
    n = 20_000
    t_p = rng.choice(5, size=n, p=p)
    losses_p = scale[t_p] * rng.exponential(size=n)
    weighted = sampler.weights(t_p) * losses_p
    t_u = rng.integers(0, 5, size=n)
    uniform = scale[t_u] * rng.exponential(size=n)
    se = np.sqrt(weighted.var(ddof=1) / n + uniform.var(ddof=1) / n)
    assert abs(weighted.mean() - uniform.mean()) < 4 * se, (weighted.mean(), uniform.mean(), se)
    assert abs(losses_p.mean() - uniform.mean()) > 20 * se  # unweighted: biased
    assert weighted.std() < uniform.std()  # the point of p_t ~ sqrt(E[L_t^2]): a less noisy estimate


def test_history_keeps_the_most_recent_losses_per_timestep() -> None:
    sampler = LossSecondMomentSampler(3, history=2)
    sampler.update(np.array([1, 1, 1, 2]), np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(sampler.losses[1], [2.0, 3.0])
    np.testing.assert_array_equal(sampler.counts, [0, 2, 1])
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 2\]"):
        sampler.update(np.array([3]), np.array([1.0]))
    with pytest.raises(ValueError, match="finite"):
        sampler.update(np.array([0]), np.array([np.nan]))
    restored = LossSecondMomentSampler(3, history=2)
    restored.load_state_dict(sampler.state_dict())
    assert restored.digest() == sampler.digest()
    with pytest.raises(ValueError, match="does not fit T=4"):
        LossSecondMomentSampler(4, history=2).load_state_dict(sampler.state_dict())


def test_example_timesteps_follow_the_given_probabilities() -> None:
    p = np.array([0.05, 0.15, 0.5, 0.3])
    x = torch.linspace(-1, 1, 2000 * 4).reshape(2000, 1, 2, 2)  # distinct images: independent draws
    t, noise = example_timesteps_and_noise(x, seed=1, step=3, num_timesteps=4, probabilities=p)
    counts = np.bincount(t.numpy(), minlength=4)
    sd = np.sqrt(2000 * p * (1 - p))
    assert np.all(np.abs(counts - 2000 * p) < 4.5 * sd), counts
    # the uniform path is unchanged, and a split batch draws the same timesteps for the same images
    t_uniform, _ = example_timesteps_and_noise(x, 1, 3, 4)
    t_half, noise_half = example_timesteps_and_noise(x[1000:], 1, 3, 4, probabilities=p)
    torch.testing.assert_close(t_half, t[1000:], rtol=0, atol=0)
    torch.testing.assert_close(noise_half, noise[1000:], rtol=0, atol=0)
    assert set(np.unique(t_uniform.numpy())) == {0, 1, 2, 3}


def test_config_allows_it_only_with_a_bound_loss() -> None:
    base = {"data.shards": "unused", "train.timestep_sampler": "loss_second_moment"}
    with pytest.raises(ValueError, match="needs diffusion.loss 'vlb' or 'hybrid'"):
        load_config(TINY).replace(base)
    assert load_config(TINY).replace({**base, "diffusion.loss": "vlb"}).train.timestep_sampler == "loss_second_moment"
    with pytest.raises(ValueError, match="train.timestep_sampler"):
        load_config(TINY).replace({"data.shards": "unused", "train.timestep_sampler": "importance"})


def test_training_updates_the_sampler_and_checkpoints_restore_it(tmp_path) -> None:
    config = load_config(TINY).replace({"data.shards": "unused", "diffusion.loss": "hybrid",
                                        "train.timestep_sampler": "loss_second_moment", "scaling.torch_threads": 1,
                                        "train.global_batch_size": 8})
    trainee = build_trainee(config, CPU, None, prepare=lambda net: net)
    diffusion = GaussianDiffusion(config.diffusion)
    x = torch.rand(8, *config.model.image_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses, t, _ = train_step(trainee, diffusion, x, config, bf16=False)
    sampler = trainee.timestep_sampler
    assert sampler.counts.sum() == 8 and all(sampler.counts[int(s)] >= 1 for s in t)
    state = TrainState(step=1, raw_weights=trainee.net.state_dict(), ema_weights=trainee.ema.state_dict(),
                       optimizer=trainee.optimizer.state_dict(), rng_states=[{"cpu": torch.get_rng_state(), "cuda": None}],
                       mlflow_run_id=None, timestep_sampler=sampler.state_dict())
    save_train_state(tmp_path, state, config)
    resumed = build_trainee(config, CPU, load_train_state(tmp_path), prepare=lambda net: net)
    assert resumed.timestep_sampler.digest() == sampler.digest()


def test_a_warm_sampler_weights_the_backpropagated_loss_with_p_before_the_update() -> None:
    """With a warmed-up sampler, the loss ``train_step`` backpropagates is mean_i L_i / (T p_{t_i})
    with the p the timesteps were drawn from (before the step's own losses update the sampler).

    The sampler is warmed on losses of 1e-3 (1 + t mod 5), so p varies fivefold and the step's real
    losses (orders of magnitude larger) move p a lot: dropping the weights, or taking p after the
    update, changes the loss by far more than the float32 tolerance; both are asserted."""
    config = load_config(TINY).replace({"data.shards": "unused", "diffusion.loss": "hybrid",
                                        "train.timestep_sampler": "loss_second_moment", "scaling.torch_threads": 1,
                                        "train.global_batch_size": 8})
    trainee = build_trainee(config, CPU, None, prepare=lambda net: net)
    diffusion = GaussianDiffusion(config.diffusion)
    sampler = trainee.timestep_sampler
    num_timesteps = sampler.num_timesteps
    every_t = np.repeat(np.arange(num_timesteps), sampler.history)
    sampler.update(every_t, 1e-3 * (1 + every_t % 5))
    assert sampler.warmed_up
    p_before = sampler.probabilities().copy()
    assert p_before.max() / p_before.min() > 4

    x = torch.rand(8, *config.model.image_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with recording_backward() as backpropagated:
        losses, t, grad_norm = train_step(trainee, diffusion, x, config, bf16=False)
    assert len(backpropagated) == 1 and torch.isfinite(grad_norm)
    per_example, steps = losses.double().numpy(), t.numpy()

    def weighted_mean(p: np.ndarray) -> float:
        return float(np.mean(per_example / (num_timesteps * p[steps])))

    expected = weighted_mean(p_before)
    assert float(backpropagated[0]) == pytest.approx(expected, rel=1e-5)
    p_after = sampler.probabilities()
    assert abs(weighted_mean(p_after) - expected) > 1e-2 * expected  # p after the update: a different loss
    assert abs(float(per_example.mean()) - expected) > 1e-2 * expected  # no weights: a different loss
