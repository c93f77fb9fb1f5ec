"""Type aliases shared by the diffusion math, the samplers and the bound.

* ``Model``: the network as the core sees it, ``model(x_t [N, C, H, W] float, t [N] int64)
  -> [N, C_out, H, W]`` with ``C_out = C``, or ``2C`` for ``variance="learned_range"``
  (docs/ARCHITECTURE.md, "The public API").
* ``Progress``: an optional callback ``progress(step_index, total_steps)`` (0-based index),
  called after each step of a loop.
* ``DenoisedFn``: an optional map applied to the predicted x_0 [N, C, H, W] before clipping.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Optional[Callable[[int, int], None]]
DenoisedFn = Optional[Callable[[torch.Tensor], torch.Tensor]]
