"""Random draws of the core, with one generator for a batch or one per group of rows.

Every random number in ``diffusion_core`` (forward-process noise, sampler noise, the timesteps of
the likelihood estimate) is drawn through :func:`randn` / :func:`rand` with the caller's
``generator``. That is ``None`` (torch's global RNG), a ``torch.Generator``, or a
:class:`RowGenerators`: the batch is the concatenation of groups of rows, group i drawing from
its own generator. A function called on the concatenated batch with ``RowGenerators`` makes, for
each group, exactly the draws (same calls, same order, same shapes but for the row count) that
it makes when called on that group alone with that group's generator. So several requests, each
with its own seed, can share every network evaluation (one forward pass over all their rows) and
still get the results they would get alone, up to float rounding of the larger batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch


@dataclass(frozen=True)
class RowGenerators:
    """Per-group generators of a batch: rows ``[offset_i, offset_i + sizes[i])`` draw from ``generators[i]``.

    Attributes:
        generators: one ``torch.Generator`` per group, on the device the draws are made on.
        sizes: rows per group (each >= 1); the batch has ``sum(sizes)`` rows.

    Raises:
        ValueError: if the two lengths differ, there is no group, or a size is < 1.
    """

    generators: tuple[torch.Generator, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.generators) != len(self.sizes) or not self.sizes:
            raise ValueError(f"need one generator per group, got {len(self.generators)} generators "
                             f"for {len(self.sizes)} groups")
        if min(self.sizes) < 1:
            raise ValueError(f"group sizes must be >= 1, got {list(self.sizes)}")

    @classmethod
    def from_seeds(
        cls, seeds: Sequence[int], sizes: Sequence[int], device: torch.device | str = "cpu"
    ) -> RowGenerators:
        """``torch.Generator(device).manual_seed(seed)`` for each group."""
        generators = tuple(torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds)
        return cls(generators, tuple(int(s) for s in sizes))

    @property
    def num_rows(self) -> int:
        """Rows of the whole batch, ``sum(sizes)``."""
        return sum(self.sizes)


Generator = Optional[Union[torch.Generator, RowGenerators]]
"""What the core's ``generator=`` arguments accept."""


def _draw(fn, shape: Sequence[int], generator: Generator, device, dtype) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    if not isinstance(generator, RowGenerators):
        return fn(shape, generator=generator, device=device, dtype=dtype)
    if not shape or shape[0] != generator.num_rows:
        raise ValueError(f"draw of shape {shape} does not have the {generator.num_rows} rows of the RowGenerators")
    return torch.cat([fn((rows, *shape[1:]), generator=g, device=device, dtype=dtype)
                      for g, rows in zip(generator.generators, generator.sizes)])


def randn(shape: Sequence[int], generator: Generator = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws of ``shape`` (``torch.randn``), per row group with ``RowGenerators``.

    Raises:
        ValueError: with ``RowGenerators`` whose row count is not ``shape[0]``.
    """
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape: Sequence[int], generator: Generator = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) draws of ``shape`` (``torch.rand``), per row group with ``RowGenerators``.

    Raises:
        ValueError: with ``RowGenerators`` whose row count is not ``shape[0]``.
    """
    return _draw(torch.rand, shape, generator, device, dtype)
