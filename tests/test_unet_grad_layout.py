"""Every weight gradient of the UNet has its parameter's strides (the DDP gradient layout contract).

DDP with ``gradient_as_bucket_view=True`` (pipelines/train_loop.py) copies each gradient into a
bucket view made with the parameter's strides and warns "Grad strides do not match bucket view
strides" when the two differ. The attention output projection (a 1x1 conv) used to receive the
single-head attention output as a channels-last *view*; oneDNN then computed the conv in
channels-last and returned the weight gradient of a contiguous [C, C, 1, 1] parameter with strides
[C, 1, C, C] instead of [C, 1, 1, 1].

Note that ``Tensor.is_contiguous()`` ignores size-1 dimensions, so it is True for both strides of a
[C, C, 1, 1] tensor; the tests compare the strides themselves, as the DDP reducer does.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.unet import UNet

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml"
# The per-worker batch of configs/fashion_mnist.yaml (64 over 2 workers). On CPU the batch matters:
# below 16 images on one thread a 1x1 conv takes the THNN path, which gives contiguous gradients.
BATCH = 32


def _configs() -> tuple[UNetConfig, DiffusionConfig]:
    sections = yaml.safe_load(CONFIG.read_text())
    return UNetConfig.from_dict(sections["model"]), DiffusionConfig.from_dict(sections["diffusion"])


def _backward(model: UNet, diffusion: GaussianDiffusion, channels_last: bool = False) -> None:
    gen = torch.Generator().manual_seed(0)
    c, s = model.config.in_channels, model.config.image_size
    x = torch.rand(BATCH, c, s, s, generator=gen) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(diffusion.num_timesteps, (BATCH,), generator=gen)
    diffusion.training_losses(model, x, t)["loss"].mean().backward()


def _layout_mismatches(model: torch.nn.Module) -> list[str]:
    return [
        f"{name}: grad {tuple(p.grad.shape)} strides {p.grad.stride()} vs param strides {p.stride()}"
        for name, p in model.named_parameters()
        if p.grad is None or p.grad.stride() != p.stride() or not p.grad.is_contiguous()
    ]


@pytest.mark.parametrize("num_heads", [1, 2])
def test_every_grad_has_its_parameters_strides(num_heads):
    unet_config, diffusion_config = _configs()
    torch.manual_seed(0)
    model = UNet(dataclasses.replace(unet_config, num_heads=num_heads)).train()
    assert all(p.is_contiguous() for p in model.parameters())
    _backward(model, GaussianDiffusion(diffusion_config))
    assert _layout_mismatches(model) == []


def test_channels_last_model_grads_have_its_parameters_strides():
    unet_config, diffusion_config = _configs()
    torch.manual_seed(0)
    model = UNet(unet_config).train().to(memory_format=torch.channels_last)
    _backward(model, GaussianDiffusion(diffusion_config), channels_last=True)
    bad = [
        f"{name}: grad strides {p.grad.stride()} vs param strides {p.stride()}"
        for name, p in model.named_parameters()
        if p.grad.stride() != p.stride()
    ]
    assert bad == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Two training steps of the Fashion-MNIST UNet under gloo DDP with gradient bucket views."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        unet_config, diffusion_config = _configs()
        torch.manual_seed(0)
        model = DistributedDataParallel(UNet(unet_config), gradient_as_bucket_view=True)
        diffusion = GaussianDiffusion(diffusion_config)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
        gen = torch.Generator().manual_seed(rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                x = torch.rand(BATCH, 1, 28, 28, generator=gen) * 2 - 1
                t = torch.randint(diffusion.num_timesteps, (BATCH,), generator=gen)
                loss = diffusion.training_losses(model, x, t)["loss"].mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        messages = [" ".join(str(w.message).split()) for w in caught if "strides" in str(w.message)]
        Path(out_dir, f"rank{rank}.txt").write_text("\n".join(messages))
    finally:
        dist.destroy_process_group()


def test_ddp_with_bucket_views_does_not_warn_about_grad_strides(tmp_path):
    """The repro of the warning: 2 gloo processes, one thread each, 2 steps (no Ray)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    warned = {rank: (tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)}
    assert warned == {0: "", 1: ""}
