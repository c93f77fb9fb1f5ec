"""Building blocks of the DDPM UNet (Ho et al. 2020, appendix B; official TF ``diffusion_tf/models/unet.py``).

Every block maps float tensors ``[N, C, H, W]`` to ``[N, C', H', W']`` and works with
``torch.autocast`` (bf16) and the ``channels_last`` memory format. Layers that Ho et al.
initialise to zero (the second conv of a residual block, the attention output projection) are
zero-initialised here too, so every residual branch starts as the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017 sec. 3.5, as in Ho et al. 2020).

    ``emb[n, i] = sin(t_n * 10000^(-i/(dim/2-1)))`` for the first ``dim/2`` features and the cosine
    for the next ``dim/2`` (the frequencies of the official DDPM code).

    Args:
        t: timesteps, shape ``[N]``, any integer or float dtype; 0-based (index 0 is the paper's t=1).
        dim: embedding width, an even integer >= 4.

    Returns:
        float32 tensor ``[N, dim]`` on ``t``'s device.

    Raises:
        ValueError: if ``t`` is not 1-D or ``dim`` is odd or < 4.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [N], got {tuple(t.shape)}")
    if dim % 2 or dim < 4:
        raise ValueError(f"embedding dim={dim} must be an even integer >= 4")
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1))
    args = t.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero in place and return it (Ho et al.'s ``init_scale=0``)."""
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


class ResBlock(nn.Module):
    """Residual block with a time-embedding shift (Ho et al. 2020 appendix B; Wide ResNet style).

    ``h = conv3x3(SiLU(GN(x))) + Linear(SiLU(emb))[:, :, None, None]``,
    ``h = conv3x3_zero(Dropout(SiLU(GN(h))))``, output ``skip(x) + h`` where ``skip`` is a 1x1 conv
    when the channel count changes and the identity otherwise.

    Args:
        in_channels: C of the input.
        out_channels: C' of the output.
        emb_channels: width of the time embedding fed to ``forward``.
        dropout: dropout probability in [0, 1).
        num_groups: GroupNorm groups; must divide ``in_channels`` and ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, H, W]``; ``emb``: ``[N, emb_channels]``. Returns ``[N, C', H, W]``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection (Ho et al. 2020 appendix B).

    ``x + proj_zero(softmax(q k^T / sqrt(d)) v)`` with ``q, k, v`` from one 1x1 conv of ``GN(x)``,
    over the H*W positions, split into ``num_heads`` heads of width ``d = C / num_heads``;
    computed with ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        channels: C of input and output.
        num_groups: GroupNorm groups; must divide ``channels``.
        num_heads: attention heads; must divide ``channels``.

    Raises:
        ValueError: if ``num_heads`` does not divide ``channels``.
    """

    def __init__(self, channels: int, num_groups: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the attention channel count {channels}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, H, W]``. Returns ``[N, C, H, W]``."""
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        # [3, N, heads, HW, d], contiguous so that SDPA can use its fused (flash) kernels.
        q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        # [N, heads, HW, d] -> [N, C, H, W]. With one head this is a view whose memory is
        # channels-last (NHWC). A 1x1 conv on a channels-last input computes in channels-last
        # (oneDNN on CPU, cuDNN on GPU) and gives its weight gradient channels-last strides
        # [C, 1, C, C]; for a contiguous model those differ from the parameter's [C, 1, 1, 1]
        # (DDP: "Grad strides do not match bucket view strides"). So the projection gets x's
        # layout: contiguous for a contiguous model (a copy of [N, C, HW]), the channels-last view
        # itself (no copy) for a channels-last model.
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        out = out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (padding 1): ``[N, C, H, W] -> [N, C, ceil(H/2), ceil(W/2)]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, H, W]``. Returns ``[N, C, ceil(H/2), ceil(W/2)]``."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour upsampling, then a 3x3 conv: ``[N, C, H, W] -> [N, C, 2H, 2W]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, H, W]``. Returns ``[N, C, 2H, 2W]``."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
