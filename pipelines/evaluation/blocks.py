"""Numbered blocks of consecutive indices, each with its own seed: the unit of work that is the
same whichever process computes it (``block_pool``, ``distributed_sampling``, ``split_bound``).
Ray-free, so that the training loop and one-process references use it too."""

from __future__ import annotations

import numpy as np


def block_seed(seed: int, block: int) -> int:
    """The seed of block ``block`` (a 63-bit int from ``numpy.random.SeedSequence([seed, block])``)."""
    state = np.random.SeedSequence([int(seed), int(block)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def num_blocks(num_items: int, block_size: int) -> int:
    """Blocks of ``block_size`` covering ``num_items`` indices (the last one may be smaller)."""
    return -(-num_items // block_size)


def block_range(block: int, block_size: int, num_items: int) -> tuple[int, int]:
    """``(start, count)`` of block ``block``: indices ``[start, start + count)``."""
    start = int(block) * block_size
    return start, min(block_size, num_items - start)
