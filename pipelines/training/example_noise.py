"""Per-example timesteps and noise that do not depend on how a batch is split across workers.

Each training image draws its timestep ``t`` and its noise from its own generator seeded by
``(seed, step, key)``, where ``key`` is a hash of the image's pixel values. So the loss of a step
is the same whether its global batch is processed by one worker or by several, in any order: the
basis of the test that data-parallel training matches a single worker exactly.
"""

from __future__ import annotations

import numpy as np
import torch

_KEY_SEED = 0x5EED


def example_keys(x_start: torch.Tensor) -> np.ndarray:
    """A 63-bit content key per image: ``sum_i k_i * w_i`` over its pixel levels
    ``k = round((x + 1) * 127.5)`` in [0, 255], with fixed pseudo-random weights ``w_i < 2**31``
    (no overflow for fewer than 2**24 pixels per image).

    Args:
        x_start: images ``[N, C, H, W]``, float, data pixels in [-1, 1].

    Returns:
        uint64 numpy array ``[N]``.

    Raises:
        ValueError: if ``x_start`` is not 4-D or has 2**24 or more values per image.
    """
    if x_start.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x_start.shape)}")
    levels = torch.round((x_start.detach().float().cpu() + 1.0) * 127.5).clamp_(0, 255).to(torch.int64)
    flat = levels.reshape(levels.shape[0], -1)
    if flat.shape[1] >= 2**24:
        raise ValueError(f"images with {flat.shape[1]} values are too large to key (< 2**24)")
    weights = torch.randint(1, 2**31, (flat.shape[1],), generator=torch.Generator().manual_seed(_KEY_SEED))
    return (flat * weights).sum(dim=1).numpy().astype(np.uint64)


def example_timesteps_and_noise(
    x_start: torch.Tensor, seed: int, step: int, num_timesteps: int, probabilities: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps (0-based, in [0, T)) and standard normal noise for each image, drawn from a
    generator seeded by ``SeedSequence([seed, step, key])`` (``key`` from ``example_keys``).

    Args:
        x_start: images ``[N, C, H, W]`` in [-1, 1] (any device).
        seed: run seed (>= 0).
        step: the 1-based optimizer step.
        num_timesteps: T.
        probabilities: ``None`` for uniform timesteps, else p_t (float ``[T]``, summing to 1): each
            image's t is the inverse CDF of p at a uniform draw of its own generator, so the draw
            still does not depend on how the batch is split.

    Returns:
        ``(t, noise)``: int64 ``[N]`` and float32 ``[N, C, H, W]`` on ``x_start``'s device.
    """
    keys = example_keys(x_start)
    cdf = None if probabilities is None else np.cumsum(np.asarray(probabilities, dtype=np.float64))
    shape = tuple(x_start.shape[1:])
    ts, noises = [], []
    for key in keys:
        state = np.random.SeedSequence([seed, step, int(key)]).generate_state(1, dtype=np.uint64)
        generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        if probabilities is None:
            ts.append(torch.randint(0, num_timesteps, (1,), generator=generator))
        else:
            u = float(torch.rand(1, generator=generator, dtype=torch.float64))
            ts.append(torch.tensor([min(int(np.searchsorted(cdf, u, side="right")), num_timesteps - 1)]))
        noises.append(torch.randn(shape, generator=generator))
    t = torch.cat(ts).to(x_start.device)
    noise = torch.stack(noises).to(x_start.device, torch.float32)
    return t, noise
