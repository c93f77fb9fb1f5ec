"""``diffusion_core.rng.RowGenerators``: a batch made of several groups, each drawing from its own
generator, gives every group the result it gets alone with that generator (samplers, bounds,
training losses), so requests with their own seeds can share network evaluations."""

from __future__ import annotations

import pytest
import torch
from _diffusion_helpers import ConvModel, grid_images, single_thread  # noqa: F401  (autouse fixture)

from diffusion_core import RowGenerators, rng
from diffusion_core.config import DiffusionConfig
from diffusion_core.diffusion import GaussianDiffusion

SEEDS, SIZES = (11, 5, 7), (2, 1, 3)


def _alone(fn) -> torch.Tensor:
    """``fn(rows, generator)`` for each group alone (``rows``: the group's slice of the batch), concatenated."""
    outs, start = [], 0
    for seed, size in zip(SEEDS, SIZES):
        outs.append(fn(slice(start, start + size), torch.Generator().manual_seed(seed)))
        start += size
    return torch.cat(outs)


@pytest.fixture
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(num_timesteps=30, schedule="cosine", variance="learned_range"))


def test_draws_per_group_equal_the_draws_of_each_generator_alone() -> None:
    together = rng.randn((6, 2, 3), RowGenerators.from_seeds(SEEDS, SIZES))
    assert torch.equal(together, _alone(lambda rows, g: torch.randn((rows.stop - rows.start, 2, 3), generator=g)))
    uniform = rng.rand((6,), RowGenerators.from_seeds(SEEDS, SIZES), dtype=torch.float64)
    assert torch.equal(uniform, _alone(lambda rows, g: torch.rand(rows.stop - rows.start, generator=g, dtype=torch.float64)))
    plain = torch.Generator().manual_seed(3)
    assert torch.equal(rng.randn((4, 2), plain), torch.randn((4, 2), generator=torch.Generator().manual_seed(3)))


def test_samplers_give_each_group_its_own_images(diffusion: GaussianDiffusion) -> None:
    model = ConvModel(1, 2)
    shape = (sum(SIZES), 1, 4, 4)
    for sampler, kwargs in (("ddim_sample_loop", {"num_steps": 6, "eta": 0.5}), ("p_sample_loop", {})):
        loop = getattr(diffusion, sampler)
        together = loop(model, shape, generator=RowGenerators.from_seeds(SEEDS, SIZES), **kwargs)
        alone = _alone(lambda rows, g: loop(model, (rows.stop - rows.start, 1, 4, 4), generator=g, **kwargs))
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_bounds_give_each_group_its_own_values(diffusion: GaussianDiffusion) -> None:
    model = ConvModel(1, 2, seed=1)
    x = grid_images((sum(SIZES), 1, 4, 4), seed=2)
    estimate = diffusion.calc_bpd_estimate(model, x, num_samples=7, generator=RowGenerators.from_seeds(SEEDS, SIZES))
    for key in ("total_bpd", "stderr"):
        alone = _alone(lambda rows, g: diffusion.calc_bpd_estimate(model, x[rows], num_samples=7, generator=g)[key])
        torch.testing.assert_close(estimate[key], alone, rtol=1e-5, atol=1e-5)
    exact = diffusion.calc_bpd_loop(model, x, generator=RowGenerators.from_seeds(SEEDS, SIZES))
    alone = _alone(lambda rows, g: diffusion.calc_bpd_loop(model, x[rows], generator=g)["vb"])
    torch.testing.assert_close(exact["vb"], alone, rtol=1e-5, atol=1e-5)


def test_training_losses_draw_noise_per_group(diffusion: GaussianDiffusion) -> None:
    model = ConvModel(1, 2, seed=3)
    x = grid_images((sum(SIZES), 1, 4, 4), seed=4)
    t = torch.tensor([0, 5, 29, 3, 3, 17])
    together = diffusion.training_losses(model, x, t, generator=RowGenerators.from_seeds(SEEDS, SIZES))["loss"]
    alone = _alone(lambda rows, g: diffusion.training_losses(model, x[rows], t[rows], generator=g)["loss"])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_bad_row_generators_are_refused() -> None:
    with pytest.raises(ValueError, match="one generator per group"):
        RowGenerators((torch.Generator(),), (1, 2))
    with pytest.raises(ValueError, match=">= 1"):
        RowGenerators.from_seeds((1, 2), (1, 0))
    with pytest.raises(ValueError, match="rows of the RowGenerators"):
        rng.randn((5, 2), RowGenerators.from_seeds(SEEDS, SIZES))
