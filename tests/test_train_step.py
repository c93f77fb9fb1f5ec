"""The per-worker training step on CPU, outside Ray: bf16 autocast (``scaling.precision: bf16``) and
the AdamW optimizer (``optimizer.name: adamw``), on the tiny UNet of configs/tiny_cpu.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion_core.diffusion import GaussianDiffusion
from pipelines.training.checkpointing import gather_replicas
from pipelines.training.config import load_config
from pipelines.training.step import TrainingDivergedError, train_step
from pipelines.training.trainee import build_optimizer, build_trainee
from pipelines.training.window import Window
from pipelines.training.worker import Worker, configure_torch

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
CPU = Worker(rank=0, world_size=1, device=torch.device("cpu"))


def _config(**overrides):
    base = {"data.shards": "unused", "scaling.torch_threads": 1, "train.global_batch_size": 8,
            "optimizer.warmup_steps": 0}
    return load_config(TINY).replace({**base, **overrides})


def _one_step(config, bf16: bool):
    trainee = build_trainee(config, CPU, None, prepare=lambda net: net)
    before = {k: v.clone() for k, v in trainee.net.state_dict().items()}
    x_start = torch.rand(8, *config.model.image_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses, t, grad_norm = train_step(trainee, GaussianDiffusion(config.diffusion), x_start, config, bf16)
    return trainee, before, losses, grad_norm


def test_bf16_autocast_runs_the_unet_in_bfloat16_on_cpu() -> None:
    config = _config(**{"scaling.precision": "bf16"})
    assert configure_torch(config.scaling, CPU.device) is True
    assert configure_torch(_config(**{"scaling.precision": "auto"}).scaling, CPU.device) is False  # fp32 on CPU
    trainee = build_trainee(config, CPU, None, prepare=lambda net: net)
    seen = []
    hook = trainee.net.conv_out.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    x_start = torch.rand(8, *config.model.image_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses, _, grad_norm = train_step(trainee, GaussianDiffusion(config.diffusion), x_start, config, bf16=True)
    hook.remove()
    assert seen == [torch.bfloat16]
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all() and torch.isfinite(grad_norm)
    # the same step in fp32 (conv_out starts at zero, so the first losses are equal): the gradient
    # that flowed through the bf16 network agrees to bf16's precision, but is not bit-identical
    _, _, losses32, grad_norm32 = _one_step(_config(), bf16=False)
    torch.testing.assert_close(losses, losses32)
    torch.testing.assert_close(grad_norm, grad_norm32, rtol=0.05, atol=0)
    assert not torch.equal(grad_norm, grad_norm32)


def test_adamw_decays_weights_decoupled_from_the_gradient() -> None:
    config = _config(**{"optimizer.name": "adamw", "optimizer.weight_decay": 0.1, "optimizer.lr": 0.01})
    trainee, before, _, _ = _one_step(config, bf16=False)
    assert type(trainee.optimizer) is torch.optim.AdamW
    changed = sum(not torch.equal(before[k], v) for k, v in trainee.net.state_dict().items())
    assert changed > 0
    # decoupled decay (Loshchilov & Hutter 2019): a parameter without gradient shrinks by (1 - lr * wd);
    # Adam's L2 decay instead feeds wd * p through the adaptive step, which moves it by about lr
    for name, expected in (("adamw", 1 - 0.01 * 0.1), ("adam", None)):
        opt_config = _config(**{"optimizer.name": name, "optimizer.weight_decay": 0.1, "optimizer.lr": 0.01}).optimizer
        p = torch.nn.Parameter(torch.full((4,), 2.0))
        optimizer = build_optimizer([p], opt_config)
        p.grad = torch.zeros_like(p)
        optimizer.step()
        if expected is not None:
            torch.testing.assert_close(p.detach(), torch.full((4,), 2.0 * expected))
        else:
            torch.testing.assert_close(p.detach(), torch.full((4,), 2.0 - 0.01), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_optimizer_name_selects_the_class(name) -> None:
    trainee = build_trainee(_config(**{"optimizer.name": name}), CPU, None, prepare=lambda net: net)
    assert type(trainee.optimizer) is {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]


def test_a_non_finite_step_is_skipped_and_a_run_of_them_stops_training() -> None:
    config = _config(**{"train.max_nonfinite_steps": 3})
    trainee = build_trainee(config, CPU, None, prepare=lambda net: net)
    diffusion = GaussianDiffusion(config.diffusion)
    good = torch.rand(8, *config.model.image_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = good.clone()
    bad[3, 0, 5, 5] = float("nan")  # one corrupt pixel poisons the batch's gradient
    window = Window(diffusion.num_timesteps, CPU.device)
    losses, t, grad_norm = train_step(trainee, diffusion, good, config, bf16=False)
    window.add(losses, t, grad_norm)
    weights = {k: v.clone() for k, v in trainee.net.state_dict().items()}
    ema = {k: v.clone() for k, v in trainee.ema.state_dict().items()}
    for skipped in (1, 2):
        losses, t, grad_norm = train_step(trainee, diffusion, bad, config, bf16=False)
        window.add(losses, t, grad_norm)
        assert not torch.isfinite(grad_norm) and trainee.nonfinite_run == skipped
        assert all(torch.equal(weights[k], v) for k, v in trainee.net.state_dict().items()), "skipped step moved weights"
        assert all(torch.equal(ema[k], v) for k, v in trainee.ema.state_dict().items())
    assert trainee.step == 3
    metrics = window.reduce(1)
    assert metrics["skipped_steps"] == 2 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert metrics["images_per_s"] > 0
    # a finite step resets the run; then three non-finite steps in a row stop training, naming the step
    train_step(trainee, diffusion, good, config, bf16=False)
    assert trainee.nonfinite_run == 0
    train_step(trainee, diffusion, bad, config, bf16=False)
    train_step(trainee, diffusion, bad, config, bf16=False)
    with pytest.raises(TrainingDivergedError, match="training diverged at step 7: 3 consecutive steps"):
        train_step(trainee, diffusion, bad, config, bf16=False)


def test_no_checkpoint_of_non_finite_weights() -> None:
    config = _config()
    trainee = build_trainee(config, CPU, None, prepare=lambda net: net)
    assert gather_replicas(CPU, trainee, 0.5)[0]["weights_sha256"]
    with torch.no_grad():
        next(trainee.net.parameters())[0].fill_(float("inf"))
    with pytest.raises(TrainingDivergedError, match="non-finite weights"):
        gather_replicas(CPU, trainee, 0.5)
