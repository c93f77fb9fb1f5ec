"""A stand-in for the FID Inception TorchScript file (``inception-2015-12-05.pt``): the same call,
``net(images_0_255, return_features=True)`` on float32 ``[N, 3, H, W]``, resizing to 299 x 299
inside, and features that report what the network was given (no weights, no download)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F


class StandInInception(torch.nn.Module):
    """Features ``[N, dim, 1, 1]`` (a pooled map: the caller must flatten it), dim >= 14, holding
    per input channel (3) the min, max and mean of the input it got, then that input's C, H, W and
    the size it resized to; zeros after that."""

    def __init__(self, dim: int = 2048) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features
        resized = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        per_channel = torch.stack([x.amin(dim=(2, 3)), x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=2)
        n = x.shape[0]
        shape = torch.tensor([x.shape[1], x.shape[2], x.shape[3], resized.shape[2], resized.shape[3]],
                             dtype=x.dtype).expand(n, 5)
        head = torch.cat([per_channel.reshape(n, -1), shape], dim=1)
        out = torch.zeros(n, self.dim, dtype=x.dtype)
        out[:, : head.shape[1]] = head
        return out.reshape(n, self.dim, 1, 1)


def save_stand_in(path: Path, dim: int = 2048) -> Path:
    """``torch.jit.save`` a scripted :class:`StandInInception` to ``path``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but the real file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(StandInInception(dim)), str(path))
    return path
