"""Exponential moving average of a model's weights (Ho et al. 2020 use decay 0.9999)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy ``ema <- d * ema + (1 - d) * w`` of every floating-point tensor in a module's
    ``state_dict`` (non-float buffers are copied as they are), with ``d = decay``, or with
    ``warmup`` ``d = min(decay, (1 + s) / (10 + s))`` after optimizer step ``s`` (1-based; the
    ``num_updates`` warm-up of TensorFlow's ExponentialMovingAverage).

    The shadow tensors live on the module's device, in float32 whatever the module's dtype.

    Raises:
        ValueError: if ``decay`` is not in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay!r} must be in [0, 1)")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.shadow = {
            k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).clone()
            for k, v in model.state_dict().items()
        }

    def decay_at(self, step: int) -> float:
        """The decay applied after optimizer step ``step`` (1-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the shadow weights towards ``model``'s current weights after optimizer step
        ``step`` (1-based; it sets the warm-up decay).

        Raises:
            KeyError: if ``model`` has a tensor the shadow does not (a different architecture).
        """
        weight = 1.0 - self.decay_at(step)
        for key, value in model.state_dict().items():
            target = self.shadow[key]
            if target.is_floating_point():
                target.lerp_(value.to(target.dtype), weight)
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights, keyed like the module's ``state_dict`` (shared, not copied)."""
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the shadow weights by ``state`` (copied onto the shadow's devices).

        Raises:
            ValueError: if the keys differ from the module's.
        """
        if set(state) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, value in state.items():
            self.shadow[key].copy_(value)

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the shadow weights into ``model`` (same architecture) and return it."""
        model.load_state_dict(self.shadow)
        return model
