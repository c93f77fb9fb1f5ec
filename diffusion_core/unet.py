"""The UNet noise-prediction network of Ho et al. 2020 (appendix B), built from a ``UNetConfig``.

Layout (as in the official ``diffusion_tf/models/unet.py``): sinusoidal timestep embedding ->
MLP; a 3x3 input conv; per resolution ``num_res_blocks`` residual blocks (self-attention after
each at the sizes in ``attention_resolutions``) and a stride-2 conv between resolutions; a
middle ResBlock-Attention-ResBlock; an up path of ``num_res_blocks + 1`` residual blocks per
resolution on the concatenation with the matching down-path activation, with nearest-neighbour
upsampling + conv between resolutions; GroupNorm, SiLU and a zero-initialised 3x3 output conv.
With the CIFAR-10 settings (``configs/cifar10_ddpm.yaml``) it has the official 35,746,307
parameters. A class-conditional model (``UNetConfig.num_classes`` set) adds a learned class
embedding to the timestep embedding, as improved-diffusion does (Dhariwal & Nichol 2021); an
unconditional model has no extra parameters, so its state dicts are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion_core.config import UNetConfig
from diffusion_core.guidance import check_class_labels
from diffusion_core.nn import AttentionBlock, Downsample, ResBlock, Upsample, timestep_embedding, zero_module


class _ResAttn(nn.Module):
    """A ``ResBlock`` optionally followed by an ``AttentionBlock``: ``[N, C, H, W] -> [N, C', H, W]``."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, H, W]``; ``emb``: ``[N, 4*model_channels]``. Returns ``[N, C', H, W]``."""
        h = self.res(x, emb)
        return self.attn(h) if self.attn is not None else h


class UNet(nn.Module):
    """DDPM UNet (Ho et al. 2020 appendix B) mapping ``(x_t, t)``, or ``(x_t, t, class_labels)``
    for a class-conditional model, to the network output.

    Args:
        config: the architecture; kept as ``self.config``.

    ``forward(x, t, class_labels=None)``:
        x: float32 ``[N, in_channels, image_size, image_size]`` (pixels in [-1, 1] for data; any
            floats for noisy ``x_t``), any memory format.
        t: int64 ``[N]`` timesteps, 0-based (index 0 is the paper's t=1).
        class_labels: only for a conditional model (``config.num_classes = K``): integer ``[N]`` in
            [-1, K), -1 = "no label" (the shards' convention for an unknown label); ``None`` means
            every row has no label. Row ``K`` of ``label_emb`` [K + 1, 4*model_channels] is the
            "no label" embedding, added to the timestep embedding like the others.
        Returns ``[N, out_channels, image_size, image_size]`` (float32, or the autocast dtype
        inside ``torch.autocast``): the eps / x_start / v prediction in the first ``in_channels``
        channels and, when ``out_channels == 2*in_channels``, the variance interpolation
        (Nichol & Dhariwal 2021 eq. 15) in the rest.

    Raises:
        TypeError: if ``config`` is not a ``UNetConfig``.
        ValueError: (in ``forward``) if ``x`` is not ``[N, in_channels, image_size, image_size]``
            or ``t`` is not ``[N]``; if ``class_labels`` is given to an unconditional model; if
            ``class_labels`` is not an integer ``[N]`` tensor in [-1, K) (the range check reads the
            values, so it is skipped while ``torch.compile`` / ``torch.export`` traces the model).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet expects a UNetConfig, got {type(config).__name__}")
        self.config = config
        ch, groups, drop = config.model_channels, config.num_groups, config.dropout
        emb_ch = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if config.num_classes is not None:
            self.label_emb = nn.Embedding(config.num_classes + 1, emb_ch)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        def stage(c_in: int, c_out: int, size: int) -> _ResAttn:
            attn = AttentionBlock(c_out, groups, config.num_heads) if size in config.attention_resolutions else None
            return _ResAttn(ResBlock(c_in, c_out, emb_ch, drop, groups), attn)

        self.down = nn.ModuleList()
        skip_channels, c, size = [ch], ch, config.image_size
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(stage(c, ch * mult, size))
                c = ch * mult
                skip_channels.append(c)
            if level != len(config.channel_mult) - 1:
                self.down.append(Downsample(c))
                skip_channels.append(c)
                size //= 2

        self.mid = nn.ModuleList(
            [
                _ResAttn(ResBlock(c, c, emb_ch, drop, groups), AttentionBlock(c, groups, config.num_heads)),
                ResBlock(c, c, emb_ch, drop, groups),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(stage(c + skip_channels.pop(), ch * mult, size))
                c = ch * mult
            if level != 0:
                self.up.append(Upsample(c))
                size *= 2

        self.norm_out = nn.GroupNorm(groups, c)
        self.conv_out = zero_module(nn.Conv2d(c, config.out_channels, 3, padding=1))

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [N, {expected[0]}, {expected[1]}, {expected[2]}]")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t has shape {tuple(t.shape)}; expected [N] = [{x.shape[0]}] to match x")

    def _label_embedding(self, class_labels: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        """The class embedding ``[N, 4*model_channels]``; -1 (and ``None``) select row K, "no label"."""
        num_classes = self.config.num_classes
        if class_labels is None:
            index = torch.full_like(t, num_classes, dtype=torch.long)
        else:
            if not torch.compiler.is_compiling():
                check_class_labels(class_labels, t.shape[0], num_classes)
            labels = class_labels.long()
            index = torch.where(labels < 0, torch.full_like(labels, num_classes), labels)
        return self.label_emb(index)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from ``x`` ``[N, C, H, W]`` at timesteps ``t`` ``[N]`` (and, for a conditional
        model, ``class_labels`` ``[N]`` in [-1, K)); see the class docstring."""
        self._check_inputs(x, t)
        emb = self.time_mlp(timestep_embedding(t, self.config.model_channels))
        if self.config.num_classes is not None:
            emb = emb + self._label_embedding(class_labels, t)
        elif class_labels is not None:
            raise ValueError(
                "class_labels were given, but this model is unconditional (UNetConfig.num_classes is None); "
                "call it as model(x_t, t)"
            )
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, _ResAttn) else block(h)
            hs.append(h)
        h = self.mid[1](self.mid[0](h, emb), emb)
        for block in self.up:
            if isinstance(block, _ResAttn):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = block(h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))
