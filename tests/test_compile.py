"""The compile switches (``scaling.compile``, ``evaluate.py --compile``, Serve's ``network: compiled``):
``torch.compile`` (inductor) on CPU gives the eager network's outputs, losses and gradients within
float32 rounding, and saved weights carry no wrapper prefixes; a class-conditional model's exported
network takes its class labels. A minimal UNet keeps the compilation
short on 2 cores."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _unet_helpers import computing_unet

from deploy.model_runner import ModelRunner
from diffusion_core.checkpoint import LoadedModel
from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.generate import SamplerSettings, generate, seeded_generator
from diffusion_core.inference_network import CHECK_TOLERANCE, build_inference_network
from diffusion_core.unet import UNet
from pipelines.registry.model_identity import ModelIdentity
from pipelines.training.config import TrainConfig
from pipelines.training.step import train_step
from pipelines.training.trainee import build_trainee
from pipelines.training.worker import Worker

pytestmark = pytest.mark.slow
UNET = UNetConfig(image_size=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, num_groups=8)
DIFFUSION = DiffusionConfig(num_timesteps=50)
CPU = Worker(rank=0, world_size=1, device=torch.device("cpu"))
#: float32 kernels fused by inductor reorder sums: agreement to this tolerance, not bit for bit
ATOL, RTOL = 1e-4, 1e-4


def _config(compile_: bool) -> TrainConfig:
    return TrainConfig.from_dict({"model": UNET.to_dict(), "diffusion": DIFFUSION.to_dict(),
                                  "data": {"shards": "unused"},
                                  "train": {"global_batch_size": 4, "seed": 1},
                                  "optimizer": {"warmup_steps": 0},
                                  "scaling": {"torch_threads": 1, "compile": compile_}})


def test_compiled_training_step_matches_eager_and_saves_plain_weights() -> None:
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    diffusion = GaussianDiffusion(DIFFUSION)
    results = {}
    for compile_ in (False, True):
        config = _config(compile_)
        trainee = build_trainee(config, CPU, None, prepare=lambda net: net)
        assert (type(trainee.model).__name__ == "OptimizedModule") is compile_
        steps = [train_step(trainee, diffusion, x, config, bf16=False) for _ in range(2)]
        results[compile_] = (steps, trainee.net.state_dict())
    (eager_steps, eager_weights), (compiled_steps, compiled_weights) = results[False], results[True]
    for (loss_e, t_e, norm_e), (loss_c, t_c, norm_c) in zip(eager_steps, compiled_steps):
        torch.testing.assert_close(t_c, t_e)
        torch.testing.assert_close(loss_c, loss_e, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(norm_c, norm_e, atol=ATOL, rtol=RTOL)
    assert compiled_weights.keys() == eager_weights.keys() == UNet(UNET).state_dict().keys()  # no _orig_mod.
    for key in eager_weights:
        torch.testing.assert_close(compiled_weights[key], eager_weights[key], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("network", ["compiled", "exported"])
def test_compiled_serving_network_samples_like_the_eager_one(network: str) -> None:
    loaded = LoadedModel(computing_unet(UNET, seed=0), GaussianDiffusion(DIFFUSION), UNET, DIFFUSION, {})
    torch._dynamo.reset()
    compiled = ModelRunner(loaded, ModelIdentity(uri="mem"), network=network)
    eager = ModelRunner(loaded, ModelIdentity(uri="mem"), network="eager")
    assert compiled.describe()["network"] == network and eager.describe()["network"] == "eager"
    settings = SamplerSettings("ddim", 5)
    with torch.no_grad():
        ours = generate(loaded.diffusion, compiled.network, (3, 1, 8, 8), settings, seeded_generator(2))
        theirs = generate(loaded.diffusion, eager.network, (3, 1, 8, 8), settings, seeded_generator(2))
        zero = generate(loaded.diffusion, UNet(UNET).eval(), (3, 1, 8, 8), settings, seeded_generator(2))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    assert (theirs - zero).abs().max() > 1e-2  # the network's output shapes the samples compared
    torch._dynamo.reset()


def test_exported_network_of_a_conditional_model_takes_class_labels() -> None:
    """torch.export with three inputs (x_t, t, class_labels) and one dynamic batch size: the network
    agrees with the eager module on labels that include -1 ("no label") rows, at batch sizes it was
    not exported at, and under classifier-free guidance (the doubled batch)."""
    config = dataclasses.replace(UNET, num_classes=3)
    model = computing_unet(config, seed=0)
    torch._dynamo.reset()
    built = build_inference_network(model, "exported", config.image_shape, "cpu")
    assert (built.mode, built.reason, built.num_classes) == ("exported", None, 3)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0, 10, 49, 3, 3]), torch.tensor([-1, 2, 0, 1, -1])
    with torch.no_grad():
        torch.testing.assert_close(built(x, t, y), model(x, t, y), atol=CHECK_TOLERANCE, rtol=CHECK_TOLERANCE)
        torch.testing.assert_close(built(x[:3], t[:3]), model(x[:3], t[:3], torch.full((3,), -1)),
                                   atol=CHECK_TOLERANCE, rtol=CHECK_TOLERANCE)
        assert (model(x, t, y) - model(x, t)).abs().max() > 1e-3  # the labels shape the outputs compared
        settings, diffusion = SamplerSettings("ddim", 4), GaussianDiffusion(DIFFUSION)
        ours, theirs = (generate(diffusion, network, (3, 1, 8, 8), settings, seeded_generator(2),
                                 class_labels=[0, 2, -1], guidance_scale=2.5) for network in (built, model))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)
    torch._dynamo.reset()


def test_evaluation_network_is_compiled_or_falls_back_to_eager(capsys) -> None:
    import torch._inductor.config as inductor_config

    from pipelines.evaluation.job import compiled_network

    model = computing_unet(UNET, seed=0)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 49])
    torch._dynamo.reset()
    network = compiled_network(model, UNET.image_shape, "cpu")
    assert type(network).__name__ == "OptimizedModule"
    with torch.no_grad():
        torch.testing.assert_close(network(x, t), model(x, t), atol=ATOL, rtol=RTOL)
    assert "compiling the UNet with torch.compile" in capsys.readouterr().err
    # a machine whose C++ compiler inductor cannot run: the evaluation goes on with the eager module
    torch._dynamo.reset()
    fallback_model = UNet(UNET).eval()
    # inductor's own config.patch: it restores the keys afterwards (monkeypatch's undo deletes a config
    # key it did not find in the module's __dict__, and every later compile in the process then fails)
    with inductor_config.patch({"fx_graph_cache": False, "cpp.cxx": ("/nonexistent/c++",)}):
        assert compiled_network(fallback_model, UNET.image_shape, "cpu") is fallback_model
    assert "warning: torch.compile failed" in capsys.readouterr().err
    torch._dynamo.reset()
