"""The small UNet configuration shared by the UNet and checkpoint tests, and ``computing_unet``: a UNet
whose output is not constant, for every test that compares two code paths."""

from __future__ import annotations

import torch

from diffusion_core.config import UNetConfig
from diffusion_core.unet import UNet

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


def computing_unet(config: UNetConfig = SMALL_UNET, seed: int = 0, scale: float = 0.05) -> UNet:
    """A ``UNet(config)`` in eval mode whose output depends on its input: every zero-initialised
    parameter (``conv_out`` and each residual block's last conv) is redrawn from N(0, scale^2) with
    ``torch.Generator().manual_seed(seed)``.

    A freshly built UNet outputs exactly 0 (``zero_module`` on its output convs), so two code paths
    compared on it agree whatever they compute. Every test that compares two paths (eager vs compiled,
    batched vs alone, Ray vs local, pyfunc vs ``generate``) uses this network instead.

    Raises:
        AssertionError: if the network's output on a fixed input is still constant.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = UNet(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.abs().any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        c, h, w = config.image_shape
        x = torch.randn((2, c, h, w), generator=generator)
        out = model(x, torch.tensor([0, 500], dtype=torch.int64))
    assert float(out.std()) > 1e-4, "computing_unet: the perturbed network's output is still constant"
    return model

