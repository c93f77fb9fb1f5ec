"""The small UNet configuration shared by the UNet and checkpoint tests."""

from __future__ import annotations

from diffusion_core.config import UNetConfig

#: Small enough to run in milliseconds, but with 2 resolutions, attention, a channel change and 2 heads.
SMALL_UNET = UNetConfig(
    image_size=8,
    in_channels=3,
    out_channels=3,
    model_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    dropout=0.1,
    num_groups=4,
    num_heads=2,
)
