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


#: Appended to an image's ``(seed, step, key)`` seed for its label-dropout draw: a stream of its own,
#: so the timesteps and noise of ``example_timesteps_and_noise`` stay what they are without labels.
_LABEL_STREAM = 1


def example_label_dropout(x_start: torch.Tensor, class_labels: torch.Tensor, seed: int, step: int,
                          label_dropout: float) -> torch.Tensor:
    """The class labels of a training batch with each replaced by -1 ("no label") with probability
    ``label_dropout`` (p_uncond of classifier-free guidance, Ho & Salimans 2022, Algorithm 1).

    Each image draws one uniform number u on [0, 1), the top 53 bits of the state of
    ``SeedSequence([seed, step, key, 1])`` (``key`` from ``example_keys``), and loses its label when
    u < ``label_dropout``: like the timesteps and noise, the draw depends on the image, the seed and
    the step, not on how the global batch is split over workers or ordered.

    Args:
        x_start: images ``[N, C, H, W]`` in [-1, 1] (any device).
        class_labels: int64 ``[N]`` in [-1, num_classes), on ``x_start``'s device.
        seed: run seed (>= 0); step: the 1-based optimizer step.
        label_dropout: p_uncond in [0, 1).

    Returns:
        int64 ``[N]`` on ``class_labels``' device: ``class_labels`` with the dropped rows set to -1.

    Raises:
        ValueError: if ``class_labels`` is not ``[N]`` for N images, or ``x_start`` not 4-D.
    """
    if class_labels.shape != (x_start.shape[0],):
        raise ValueError(f"class_labels must be [N] = [{x_start.shape[0]}], got shape {tuple(class_labels.shape)}")
    if label_dropout <= 0.0:
        return class_labels
    states = np.array([np.random.SeedSequence([seed, step, int(key), _LABEL_STREAM]).generate_state(1, np.uint64)[0]
                       for key in example_keys(x_start)], dtype=np.uint64)
    draws = (states >> np.uint64(11)).astype(np.float64) / 2.0**53  # the top 53 bits: uniform on [0, 1)
    dropped = torch.from_numpy(draws < label_dropout).to(class_labels.device)
    return torch.where(dropped, torch.full_like(class_labels, -1), class_labels)
