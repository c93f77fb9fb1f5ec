"""The bound in seeded blocks (``evaluation.metrics.bound_blocks``): a block's figures do not depend
on which other blocks are computed with it, and the summaries split the bound exactly into
L_T + sum of L_t (t >= 1) + L_0, per timestep and in total."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_core.bound import strata_bounds
from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.unet import UNet
from pipelines.evaluation.blocks import block_range, block_seed, num_blocks
from pipelines.evaluation.metrics import bound_blocks, estimate_bpd, exact_bpd, summarize_estimate, summarize_exact

T = 24


@pytest.fixture(scope="module")
def setup() -> tuple[GaussianDiffusion, UNet, torch.Tensor]:
    torch.manual_seed(0)
    unet = UNetConfig(image_size=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,),
                      num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_groups=4)
    images = torch.randint(0, 256, (7, 1, 8, 8)).float() / 127.5 - 1
    return GaussianDiffusion(DiffusionConfig(num_timesteps=T)), UNet(unet).eval(), images


def test_blocks_cover_the_indices() -> None:
    assert num_blocks(7, 3) == 3 and [block_range(b, 3, 7) for b in range(3)] == [(0, 3), (3, 3), (6, 1)]
    assert block_seed(0, 1) != block_seed(0, 2) and block_seed(5, 1) == block_seed(5, 1)


@pytest.mark.parametrize("num_samples", [0, 6])
def test_a_block_alone_equals_its_rows_among_all(setup, num_samples: int) -> None:
    diffusion, model, images = setup
    everything = bound_blocks(diffusion, model, images, num_samples, seed=4, block_size=3)
    assert everything["index"].tolist() == list(range(7))
    alone = bound_blocks(diffusion, model, images, num_samples, seed=4, block_size=3, blocks=np.array([1]))
    assert alone["index"].tolist() == [3, 4, 5]
    for key, column in alone.items():
        np.testing.assert_allclose(column, everything[key][3:6], rtol=1e-6)
    other_seed = bound_blocks(diffusion, model, images, num_samples, seed=5, block_size=3)
    assert not np.allclose(other_seed["total_bpd"], everything["total_bpd"])


def test_exact_summary_splits_the_bound(setup) -> None:
    diffusion, model, images = setup
    rows = bound_blocks(diffusion, model, images, 0, seed=1, block_size=4)
    exact = summarize_exact(rows)
    assert exact["vb_per_t"].shape == (T,) and exact["images"] == 7
    assert exact["prior_bpd"] + exact["terms_bpd"] + exact["decoder_bpd"] == pytest.approx(exact["bpd"], rel=1e-6)
    assert exact["decoder_bpd"] == pytest.approx(rows["vb"][:, 0].mean())
    assert exact["bpd_stderr_images"] == pytest.approx(rows["total_bpd"].std(ddof=1) / np.sqrt(7))
    assert exact_bpd(diffusion, model, images, seed=1, batch_size=4)["bpd"] == pytest.approx(exact["bpd"])


def test_estimate_summary_splits_the_bound_and_brackets_the_exact_one(setup) -> None:
    diffusion, model, images = setup
    rows = bound_blocks(diffusion, model, images, 8, seed=2, block_size=4)
    est = summarize_estimate(rows, T, 8)
    widths = np.diff(strata_bounds(T, 4))
    assert rows["stratum_bpd"].shape == (7, 4) and widths[0] == 1
    assert est["per_t"].shape == (T,)
    assert est["per_t"].sum() + est["prior_bpd"] == pytest.approx(est["bpd"], rel=1e-5)
    assert est["prior_bpd"] + est["terms_bpd"] + est["decoder_bpd"] == pytest.approx(est["bpd"], rel=1e-5)
    assert est["bpd_stderr"] == pytest.approx(np.sqrt((rows["stderr"] ** 2).sum()) / 7)
    exact = summarize_exact(bound_blocks(diffusion, model, images, 0, seed=2, block_size=4))
    assert abs(est["bpd"] - exact["bpd"]) <= 4 * est["bpd_stderr"]
    assert est["prior_bpd"] == pytest.approx(exact["prior_bpd"], rel=1e-6)  # L_T is exact in both
    # with K = 2 there is one stratum: t = 0 is not alone, so L_0 is not split off
    two = summarize_estimate(bound_blocks(diffusion, model, images, 2, seed=2, block_size=4), T, 2)
    assert two["decoder_bpd"] is None and two["terms_bpd"] is None
    assert estimate_bpd(diffusion, model, images, 8, seed=2, batch_size=4)["bpd"] == pytest.approx(est["bpd"])
