"""benchmarks/bench_gpu.py: its built-in configs equal the YAML ones, and its CPU (tiny) path runs
without PyYAML and reports finite positive numbers with a FLOP count that matches a closed form."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _bench_helpers import load_bench

from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.nn import AttentionBlock
from diffusion_core.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


bench = load_bench("bench_gpu")


def _yaml_configs(name: str) -> tuple[UNetConfig, DiffusionConfig]:
    sections = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    return UNetConfig.from_dict(sections["model"]), DiffusionConfig.from_dict(sections["diffusion"])


def test_cifar10_config_equals_the_yaml():
    unet, diffusion = _yaml_configs("cifar10_ddpm")
    assert bench.CIFAR10_UNET == unet
    assert bench.CIFAR10_DIFFUSION == diffusion


def test_tiny_config_equals_the_yaml():
    unet, diffusion = _yaml_configs("tiny_cpu")
    assert bench.TINY_UNET == unet
    assert bench.TINY_DIFFUSION == diffusion


def test_cifar10_model_has_35_7m_parameters():
    with torch.device("meta"):
        count = sum(p.numel() for p in UNet(bench.CIFAR10_UNET).parameters())
    assert count == bench.CIFAR10_PARAMETERS == 35_746_307


@pytest.mark.parametrize(
    "name,peak",
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0),
     ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Future GPU", None), (None, None)],
)
def test_peak_table(name, peak):
    args = bench.parse_args(["--device", "cpu"])
    assert bench.peak_tflops(args, name)[0] == peak
    args = bench.parse_args(["--device", "cpu", "--peak-tflops", "500"])
    assert bench.peak_tflops(args, name) == (500.0, "--peak-tflops")


@pytest.mark.parametrize(
    "kernel,kind",
    [("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul / conv"),
     ("void cudnn::cnn::conv2d_grouped_direct_kernel<false>", "matmul / conv"),
     ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<256>>", "attention"),
     ("triton_red_fused_native_group_norm_0", "inductor / triton fused"),
     ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer (fused Adam)"),
     ("void nchwToNhwcKernel<__nv_bfloat16>", "copy / layout"),
     ("void at::native::vectorized_elementwise_kernel<4, silu_kernel>", "elementwise")],
)
def test_kernel_kinds(kernel, kind):
    assert bench._kernel_kind(kernel) == kind


def _closed_form_flops(config: UNetConfig, n: int) -> tuple[float, float]:
    """(training step, forward) FLOPs per image: 2 x MACs of every conv and linear, 4 N (HW)^2 C for
    each attention's two matmuls; backward = 2 x forward except the input gradients nobody needs
    (the input conv's and the first time-MLP layer's inputs do not require grad)."""
    model = UNet(config).train()
    forward = {"total": 0.0, "no_input_grad": 0.0}

    def conv_or_linear(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            flops = 2.0 * output.numel() * module.in_channels * kh * kw / module.groups
        else:
            flops = 2.0 * output.numel() * module.in_features
        forward["total"] += flops
        if module is model.conv_in or module is model.time_mlp[0]:
            forward["no_input_grad"] += flops

    def attention(module, inputs, output):
        b, c, h, w = inputs[0].shape
        forward["total"] += 4.0 * b * (h * w) ** 2 * c

    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(conv_or_linear)
        elif isinstance(module, AttentionBlock):
            module.register_forward_hook(attention)
    with torch.no_grad():
        s = config.image_size
        model(torch.zeros(n, config.in_channels, s, s), torch.zeros(n, dtype=torch.long))
    training = 3 * forward["total"] - forward["no_input_grad"]
    return training / n, forward["total"] / n


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# Runs the benchmark as `python benchmarks/bench_gpu.py` would, but with the packages that the GPU
# machine lacks made unimportable.
_BLOCKED_RUN = (
    "import runpy, sys\n"
    "for name in ('yaml', 'ray', 'mlflow', 'pipelines'):\n"
    "    sys.modules[name] = None\n"
    "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
    "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0])\n"  # the script's folder, as `python script.py` has it
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def test_cpu_tiny_run_reports_finite_positive_numbers(tmp_path):
    output = tmp_path / "bench_gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, str(SCRIPT), "--device", "cpu", "--threads", "1",
         "--profile", "--profile-steps", "1", "--output", str(output)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train_eager" in proc.stdout and "wrote" in proc.stdout
    written = json.loads(output.read_text())
    assert list(written) == ["date", "commit", "machine", "command", "figures"]
    assert written["machine"]["device"] == "cpu" and written["command"].startswith("python benchmarks/bench_gpu.py --device cpu")
    assert set(written["machine"]["load_average_1m"]) == {"start", "end"}
    report = written["figures"]

    assert report["tiny"] is True and report["errors"] == {}
    assert UNetConfig.from_dict(report["unet"]) == bench.TINY_UNET
    assert report["parameters"] == sum(p.numel() for p in UNet(bench.TINY_UNET).parameters())
    assert report["settings"]["precision"] == "fp32" and report["settings"]["compile"] is False
    results = report["results"]
    assert set(results) == {"train_eager", "ddim_eager", "bound_eager"}
    for row in results.values():
        assert _positive_finite(row["images_per_s"]), row
    train = results["train_eager"]
    assert _positive_finite(train["seconds_per_step"]) and _positive_finite(train["achieved_tflops"])
    assert train["share_of_peak"] is None and train["peak_memory_gib"] is None  # CPU: no peak, no CUDA memory
    assert results["bound_eager"]["extrapolated"] is True
    assert results["bound_eager"]["num_timesteps"] == bench.TINY_DIFFUSION.num_timesteps

    flops = report["flops"]
    expected_training, expected_forward = _closed_form_flops(bench.TINY_UNET, flops["counted_at_batch"])
    assert flops["flops_per_image"] == pytest.approx(expected_training, rel=0.01)
    assert flops["forward_flops_per_image"] == pytest.approx(expected_forward, rel=0.01)
    assert 2.5 < flops["flops_per_image"] / flops["forward_flops_per_image"] <= 3.0
    assert train["achieved_tflops"] == pytest.approx(flops["flops_per_image"] * train["images_per_s"] / 1e12)

    profile = report["profile"]
    assert profile["variant"] == "eager" and len(profile["top_ops"]) == 15
    assert all(_positive_finite(op["self_time_ms_per_step"]) for op in profile["top_ops"][:3])
    assert "Name" in profile["table"]
