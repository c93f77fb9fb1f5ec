"""Benchmark Ho et al.'s CIFAR-10 UNet (35.7M parameters) on one GPU: training, DDIM, exact bound.

Measures, for the model and diffusion of ``configs/cifar10_ddpm.yaml`` (built in code below, so that
the script needs only torch, numpy, safetensors and ``diffusion_core``; the YAML is not read),
freshly initialised with a fixed seed on random inputs (speed does not depend on the weights):

* training images/s at batch 128: one step = ``GaussianDiffusion.training_losses`` (simple loss)
  forward + backward + ``torch.optim.Adam(fused=True)``, under bf16 autocast, channels-last and
  TF32, eager and ``torch.compile``d (inductor, default mode, ``dynamic=False``). ``--warmup-steps``
  steps (the compile included) are excluded; the ``--steps`` timed ones lie between two
  ``torch.cuda.synchronize`` calls;
* the UNet's FLOPs per image of one training step (forward + backward), counted with
  ``torch.utils.flop_counter.FlopCounterMode``; the achieved TFLOP/s (FLOPs/image x images/s) and
  its share of the device's dense bf16 peak (``--peak-tflops``, else a table by device name:
  H100 SXM and H200 989 TFLOP/s; null for an unknown device);
* peak memory of each training variant (``torch.cuda.max_memory_allocated``);
* DDIM-50 sampling images/s at batch 256 (``ddim_sample_loop`` under bf16 autocast, no grad),
  one full loop timed after a 2-step warm-up loop;
* exact-bound images/s (``calc_bpd_loop``, T = 1000 network calls per batch): EXTRAPOLATED -- the
  loop is stopped after ``--bound-warmup`` + ``--bound-timesteps`` of its T terms, and images/s =
  batch / (mean seconds per timed term x T);
* with ``--profile``: one torch.profiler window of ``--profile-steps`` training steps (the
  compiled variant when it ran, else eager), the top 15 ops by self device time and the GPU
  kernel time by kind (matmul/conv, attention, inductor/triton, elementwise, optimizer, ...), so
  that a miss of the target shows where the time goes.

Each measurement is isolated: one that fails (say the compile) records its error in the JSON under
``errors`` and the others still run. Progress lines go to stdout as they happen.

Target: >= 5,000 training images/s for the 35.7M model in bf16 on one H100/H200. For scale, Ho et
al. trained at 21 steps/s x 128 = 2,688 images/s on a TPU v3-8.

Run, on a CUDA machine that has only torch + numpy + safetensors (about 5-8 minutes with the
compile)::

    PYTHONPATH=. python benchmarks/bench_gpu.py                  # writes benchmarks/results/bench_gpu.json
    PYTHONPATH=. python benchmarks/bench_gpu.py --profile --output /tmp/bench_gpu.json
    PYTHONPATH=. python benchmarks/bench_gpu.py --skip-compile   # eager only, ~1 minute

Without CUDA (or with ``--tiny``) it runs the tiny model of ``configs/tiny_cpu.yaml`` in fp32 on a
batch of 8 for a few steps, without compile unless ``--compile`` is given: a smoke test of every
code path in seconds (tests/test_bench_gpu.py), not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

import torch
from cli import add_threads, bench_parser, require_at_least
from machine import machine_info
from report import build_report, load_average_1m, write_report
from table import Column, print_table
from timing import ProgressTimer, time_calls
from torch.utils.flop_counter import FlopCounterMode

from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench_gpu"
TARGET_IMAGES_PER_S = 5000.0

# The `model:` and `diffusion:` sections of configs/cifar10_ddpm.yaml (Ho et al. 2020's CIFAR-10
# model); tests/test_bench_gpu.py checks that they equal the YAML.
CIFAR10_UNET = UNetConfig(
    image_size=32,
    in_channels=3,
    out_channels=3,
    model_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16,),
    dropout=0.1,
    num_groups=32,
    num_heads=1,
)
CIFAR10_DIFFUSION = DiffusionConfig(
    num_timesteps=1000, schedule="linear", prediction="eps", variance="fixed_small", loss="simple"
)
CIFAR10_PARAMETERS = 35_746_307  # the official diffusion_tf CIFAR-10 model

# The `model:` and `diffusion:` sections of configs/tiny_cpu.yaml (checked the same way).
TINY_UNET = UNetConfig(
    image_size=28,
    in_channels=1,
    out_channels=1,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(14,),
    dropout=0.0,
    num_groups=8,
    num_heads=1,
)
TINY_DIFFUSION = DiffusionConfig(
    num_timesteps=200, schedule="linear", prediction="eps", variance="fixed_small", loss="simple"
)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched in order against the device name.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)

LR = 2e-4  # configs/cifar10_ddpm.yaml (Ho et al. 2020, appendix B)


def log(message: str) -> None:
    """One progress line, flushed at once."""
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------- setup
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see ``--help``); ``--tiny`` (implied without CUDA) sets small defaults."""
    p = bench_parser(SCRIPT, __doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--tiny", action="store_true",
                   help="configs/tiny_cpu.yaml's model, fp32, small batches (the default without CUDA)")
    p.add_argument("--batch", type=int, default=None, help="training batch (128; tiny 8)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed training steps first (20; tiny 2)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (50; tiny 3)")
    p.add_argument("--sample-batch", type=int, default=None, help="DDIM batch (256; tiny 4)")
    p.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps (50; tiny 5)")
    p.add_argument("--bound-batch", type=int, default=None, help="calc_bpd_loop batch (256; tiny 4)")
    p.add_argument("--bound-timesteps", type=int, default=None,
                   help="timed terms of calc_bpd_loop before extrapolating to all T (20; tiny 3)")
    p.add_argument("--bound-warmup", type=int, default=None, help="untimed first terms (3; tiny 1)")
    p.add_argument("--skip-compile", action="store_true", help="eager only")
    p.add_argument("--compile", action="store_true", help="also torch.compile in --tiny / CPU runs")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default: 'default')")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the device in TFLOP/s (default: by device name, see PEAK_BF16_TFLOPS)")
    p.add_argument("--profile", action="store_true", help="profile a few training steps with torch.profiler")
    p.add_argument("--profile-steps", type=int, default=5)
    add_threads(p, None, help="torch.set_num_threads (CPU; default 2)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.tiny = args.tiny or args.device.type != "cuda"
    defaults = dict(batch=(8, 128), warmup_steps=(2, 20), steps=(3, 50), sample_batch=(4, 256),
                    ddim_steps=(5, 50), bound_batch=(4, 256), bound_timesteps=(3, 20), bound_warmup=(1, 3))
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    require_at_least(p, args, {**dict.fromkeys(("batch", "steps", "sample_batch", "ddim_steps", "bound_batch",
                                                "bound_timesteps", "profile_steps", "threads"), 1),
                               "warmup_steps": 0, "bound_warmup": 0})
    args.use_compile = not args.skip_compile and (not args.tiny or args.compile)
    return args


def peak_tflops(args: argparse.Namespace, gpu_name: str | None) -> tuple[float | None, str]:
    """The dense bf16 peak used for the share of peak, and where it came from."""
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if gpu_name:
        for key, value in PEAK_BF16_TFLOPS:
            if key.lower() in gpu_name.lower():
                return value, f"table entry {key!r} for {gpu_name!r}"
    return None, f"unknown device {gpu_name or 'cpu'!r}: pass --peak-tflops"


def set_fast_math(device: torch.device) -> None:
    """TF32 for the float32 matmuls and convolutions left outside autocast (GPU)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


class Setup:
    """What every measurement shares: model config, diffusion, device, precision, layout."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = args.device
        self.unet_config = TINY_UNET if args.tiny else CIFAR10_UNET
        self.diffusion = GaussianDiffusion(TINY_DIFFUSION if args.tiny else CIFAR10_DIFFUSION)
        self.bf16 = self.device.type == "cuda"
        self.channels_last = self.device.type == "cuda"
        self.fused_adam = self.device.type == "cuda"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def new_model(self) -> UNet:
        torch.manual_seed(0)
        model = UNet(self.unet_config).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def compile(self, model: UNet):
        return torch.compile(model, mode=self.args.compile_mode, dynamic=False)

    def images(self, n: int) -> torch.Tensor:
        """Random data pixels k/127.5 - 1 on the device, [n, C, H, W]."""
        c, s = self.unet_config.in_channels, self.unet_config.image_size
        return self.layout(torch.randint(0, 256, (n, c, s, s), device=self.device).float() / 127.5 - 1.0)

    def optimizer(self, model: UNet) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=LR, fused=True if self.fused_adam else None)


def train_step(setup: Setup, net, optimizer: torch.optim.Optimizer, x_start: torch.Tensor) -> None:
    """One training step: simple loss forward, backward, Adam."""
    t = torch.randint(setup.diffusion.num_timesteps, (x_start.shape[0],), device=setup.device)
    with setup.autocast():
        loss = setup.diffusion.training_losses(net, x_start, t)["loss"].mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# ---------------------------------------------------------------------------------------- measurements
def count_flops(setup: Setup, model: UNet, batch: int) -> dict:
    """FLOPs per image of one training step (forward + backward of the simple loss) and of the
    forward alone, with FlopCounterMode. On CPU the fused SDPA kernel has no FLOP formula, so the
    count runs with the math SDPA backend (the same matmul FLOPs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model.train()
    x_start = setup.images(batch)
    t = torch.randint(setup.diffusion.num_timesteps, (batch,), device=setup.device)
    sdpa = sdpa_kernel([SDPBackend.MATH]) if setup.device.type == "cpu" else contextlib.nullcontext()
    with sdpa:
        with FlopCounterMode(display=False) as forward_counter, torch.no_grad(), setup.autocast():
            setup.diffusion.training_losses(model, x_start, t)
        with FlopCounterMode(display=False) as counter:
            with setup.autocast():
                loss = setup.diffusion.training_losses(model, x_start, t)["loss"].mean()
            loss.backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(op): n / batch for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {
        "flops_per_image": counter.get_total_flops() / batch,
        "forward_flops_per_image": forward_counter.get_total_flops() / batch,
        "flops_by_op_per_image": by_op,
        "counted_at_batch": batch,
        "sdpa_backend_for_count": "math" if setup.device.type == "cpu" else "default",
    }


def time_training(setup: Setup, name: str, compiled: bool) -> dict:
    """Images/s of ``args.steps`` training steps after ``args.warmup_steps`` (compile included)."""
    args = setup.args
    model = setup.new_model().train()
    net = setup.compile(model) if compiled else model
    optimizer = setup.optimizer(model)
    x_start = setup.images(args.batch)
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(setup.device)
    timing = time_calls(lambda _: train_step(setup, net, optimizer, x_start), args.steps, warmup=args.warmup_steps,
                        sync=setup.sync, sync_each=False)  # no stall between the timed steps
    if timing.first_s is not None:
        log(f"{name}: first step{' (incl. compile)' if compiled else ''} {timing.first_s:.1f} s")
    result = {
        "batch": args.batch,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "seconds_per_step": timing.mean,
        "images_per_s": args.batch / timing.mean,
        "first_step_s": timing.first_s,
        "warmup_s": timing.warmup_s,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(setup.device) / 2**30
                            if setup.device.type == "cuda" else None),
    }
    return {"result": result, "model": model, "net": net, "optimizer": optimizer, "x_start": x_start}


def time_ddim(setup: Setup, net, model: UNet) -> dict:
    """One full DDIM loop at ``sample_batch`` after a 2-step warm-up loop, bf16 autocast, no grad."""
    args = setup.args
    model.eval()
    shape = (args.sample_batch, *setup.unet_config.image_shape)
    try:
        with torch.no_grad(), setup.autocast():
            elapsed = time_calls(lambda i: setup.diffusion.ddim_sample_loop(
                net, shape, num_steps=args.ddim_steps if i else min(2, args.ddim_steps)), 1, warmup=1,
                sync=setup.sync).total
    finally:
        model.train()
    return {"batch": args.sample_batch, "ddim_steps": args.ddim_steps, "seconds": elapsed,
            "images_per_s": args.sample_batch / elapsed, "extrapolated": False}


def time_bound(setup: Setup, net, model: UNet) -> dict:
    """calc_bpd_loop images/s, EXTRAPOLATED from ``bound_timesteps`` timed terms (after
    ``bound_warmup`` untimed ones) to all T terms; synchronized only at the window's two ends."""
    args = setup.args
    T = setup.diffusion.num_timesteps
    warmup = min(args.bound_warmup, T - 1)
    timed = min(args.bound_timesteps, T - warmup)
    model.eval()
    x_start = setup.images(args.bound_batch)
    timer = ProgressTimer(setup.sync, warmup=warmup, limit=timed, sync_each=False)
    try:
        with torch.no_grad(), setup.autocast():
            per_term = timer.run(lambda progress: setup.diffusion.calc_bpd_loop(net, x_start, progress=progress)).mean
    finally:
        model.train()
    return {"batch": args.bound_batch, "num_timesteps": T, "warmup_terms": warmup, "timed_terms": timed,
            "seconds_per_term": per_term, "images_per_s": args.bound_batch / (per_term * T),
            "extrapolated": True,
            "note": f"timed {timed} of the {T} terms of calc_bpd_loop; images/s = batch / (s/term x {T})"}


_KERNEL_KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("optimizer (fused Adam)", re.compile(r"adam|multi_tensor", re.I)),
    ("inductor / triton fused", re.compile(r"^triton", re.I)),
    ("copy / layout", re.compile(r"nchwToNhwc|nhwcToNchw|memcpy|memset|copy|CatArray|transpose", re.I)),
    ("matmul / conv", re.compile(r"gemm|cutlass|xmma|sm\d\d_|conv(?!ert)|cudnn|implicit|wgrad|dgrad", re.I)),
    ("norm / reduction", re.compile(r"norm|reduce|softmax", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|pointwise", re.I)),
)


def _kernel_kind(name: str) -> str:
    for kind, pattern in _KERNEL_KINDS:
        if pattern.search(name):
            return kind
    return "other"


def profile_training(setup: Setup, trained: dict, label: str) -> dict:
    """Profile ``profile_steps`` training steps of an already warmed variant."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    steps = setup.args.profile_steps
    setup.sync()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(setup, trained["net"], trained["optimizer"], trained["x_start"])
        setup.sync()
    averages = prof.key_averages()
    cuda = setup.device.type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    try:
        table = averages.table(sort_by=key, row_limit=15)
    except Exception:  # older profilers name the device column "cuda"
        key = "self_cuda_time_total" if cuda else key
        table = averages.table(sort_by=key, row_limit=15)

    def self_time_us(evt) -> float:
        for attr in ((["self_device_time_total", "self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]):
            if hasattr(evt, attr):
                return float(getattr(evt, attr))
        return 0.0

    rows = sorted(averages, key=self_time_us, reverse=True)
    top = [{"name": evt.key, "count": int(evt.count), "self_time_ms_per_step": self_time_us(evt) / 1e3 / steps}
           for evt in rows[:15]]
    kinds: dict[str, float] = {}
    if cuda:  # GPU kernels only (the events of the CUDA device), by kind
        from torch.autograd import DeviceType

        for evt in averages:
            if getattr(evt, "device_type", None) == DeviceType.CUDA:
                kind = _kernel_kind(evt.key)
                kinds[kind] = kinds.get(kind, 0.0) + self_time_us(evt) / 1e3 / steps
    total = sum(kinds.values())
    return {
        "variant": label,
        "steps": steps,
        "sorted_by": key,
        "top_ops": top,
        "kernel_ms_per_step_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "kernel_ms_per_step_total": total if cuda else None,
        "table": table,
    }


# ---------------------------------------------------------------------------------------- driver
def attempt(report: dict, name: str, fn: Callable[[], object]):
    """Run one measurement; on failure record the error under ``report['errors'][name]``."""
    log(f"{name} ...")
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 -- one failure must not end the benchmark
        report["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
        report["tracebacks"][name] = traceback.format_exc()[-4000:]
        log(f"{name} FAILED after {time.perf_counter() - t0:.1f} s: {type(exc).__name__}: {str(exc)[:300]}")
        if setup_device_is_cuda():
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        return None
    log(f"{name} done in {time.perf_counter() - t0:.1f} s")
    return value


def setup_device_is_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def add_flop_rates(report: dict) -> None:
    """TFLOP/s and share of peak for every training row, from the counted FLOPs per image."""
    flops = (report.get("flops") or {}).get("flops_per_image")
    peak = report["peak_bf16_dense_tflops"]
    for key, row in report["results"].items():
        if not key.startswith("train") or row is None:
            continue
        tflops = flops * row["images_per_s"] / 1e12 if flops else None
        row["achieved_tflops"] = tflops
        row["share_of_peak"] = tflops / peak if (tflops is not None and peak and not report["tiny"]) else None


def run(args: argparse.Namespace) -> dict:
    """Every measurement; returns the report dict (also on partial failure)."""
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads or 2)
    set_fast_math(args.device)
    setup = Setup(args)
    info = machine_info(args.device)
    peak, peak_source = peak_tflops(args, info.get("gpu"))
    report: dict = {
        "benchmark": "bench_gpu",
        "tiny": args.tiny,
        "model_source": "configs/tiny_cpu.yaml" if args.tiny else "configs/cifar10_ddpm.yaml",
        "unet": setup.unet_config.to_dict(),
        "diffusion": setup.diffusion.config.to_dict(),
        "settings": {
            "device": str(args.device),
            "precision": "bf16 autocast" if setup.bf16 else "fp32",
            "channels_last": setup.channels_last,
            "tf32": args.device.type == "cuda",
            "optimizer": f"Adam(lr={LR}, fused={setup.fused_adam})",
            "compile": args.use_compile,
            "compile_mode": args.compile_mode if args.use_compile else None,
            "batch": args.batch, "warmup_steps": args.warmup_steps, "steps": args.steps,
            "sample_batch": args.sample_batch, "ddim_steps": args.ddim_steps,
            "bound_batch": args.bound_batch, "bound_timesteps": args.bound_timesteps,
            "bound_warmup": args.bound_warmup,
        },
        "machine": info,
        "peak_bf16_dense_tflops": peak,
        "peak_source": peak_source,
        "target_training_images_per_s": TARGET_IMAGES_PER_S,
        "results": {},
        "errors": {},
        "tracebacks": {},
        "profile": None,
    }
    start = time.perf_counter()
    log(f"device {args.device} ({info.get('gpu') or info['processor']}), torch {torch.__version__}, "
        f"{'tiny' if args.tiny else 'CIFAR-10'} model, {report['settings']['precision']}, "
        f"compile={args.use_compile}")

    with torch.device("meta"):
        params = sum(p.numel() for p in UNet(setup.unet_config).parameters())
    report["parameters"] = params
    report["parameters_expected"] = None if args.tiny else CIFAR10_PARAMETERS
    log(f"UNet parameters: {params:,}" + ("" if args.tiny else
        f" (Ho et al.'s CIFAR-10 model: {CIFAR10_PARAMETERS:,}; {'OK' if params == CIFAR10_PARAMETERS else 'MISMATCH'})"))
    if not args.tiny and params != CIFAR10_PARAMETERS:
        report["errors"]["parameters"] = f"{params} parameters, expected {CIFAR10_PARAMETERS}"

    report["flops"] = attempt(report, "flop count", lambda: count_flops(setup, setup.new_model(), args.batch))
    if report["flops"]:
        f = report["flops"]
        log(f"training FLOPs/image {f['flops_per_image'] / 1e9:.2f} GFLOP "
            f"(forward {f['forward_flops_per_image'] / 1e9:.2f} GFLOP)")

    variants = [("eager", False)] + ([("compiled", True)] if args.use_compile else [])
    trained: dict[str, dict] = {}
    for label, compiled in variants:
        out = attempt(report, f"train {label}", lambda c=compiled, lb=label: time_training(setup, f"train {lb}", c))
        report["results"][f"train_{label}"] = out["result"] if out else None
        if out:
            trained[label] = out
            log(f"train {label}: {out['result']['images_per_s']:,.1f} images/s")
    add_flop_rates(report)

    if args.profile and trained:
        label = "compiled" if "compiled" in trained else "eager"
        report["profile"] = attempt(report, f"profile train {label}", lambda: profile_training(setup, trained[label], label))
        if report["profile"]:
            print(report["profile"]["table"], flush=True)

    for label, compiled in variants:
        if label in trained:
            net, model = trained[label]["net"], trained[label]["model"]
        elif not compiled:
            model = setup.new_model()
            net = model
        else:
            continue  # the compile failed once already
        ddim = attempt(report, f"ddim {label}", lambda n=net, m=model: time_ddim(setup, n, m))
        report["results"][f"ddim_{label}"] = ddim
        if label == "eager" or ddim is not None:
            bound = attempt(report, f"bound {label}", lambda n=net, m=model: time_bound(setup, n, m))
            report["results"][f"bound_{label}"] = bound
    best = max((r["images_per_s"] for k, r in report["results"].items() if k.startswith("train") and r), default=None)
    report["best_training_images_per_s"] = best
    report["target_met"] = None if (best is None or args.tiny) else best >= TARGET_IMAGES_PER_S
    report["wall_s"] = time.perf_counter() - start
    return report


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _rate(value: float) -> str:
    """images/s with 4 significant digits for small values (tiny CPU runs), 1 decimal otherwise."""
    return f"{value:.1f}" if value >= 1000 else f"{value:.4g}"


def _note(key: str, r: dict) -> str:
    if key.startswith("train"):
        return f"{r['timed_steps']} steps after {r['warmup_steps']} warm-up (first {_fmt(r['first_step_s'], '.1f')} s)"
    if key.startswith("ddim"):
        return f"{r['ddim_steps']} steps, one loop"
    return f"extrapolated from {r['timed_terms']} of {r['num_timesteps']} terms"


COLUMNS = (
    Column("measurement", "key", align="<"), Column("batch", "batch"),
    Column("images/s", lambda r: "FAILED" if r.get("failed") else _rate(r["images_per_s"])),
    Column("TFLOP/s", "achieved_tflops", ".1f"),
    Column("of peak", lambda r: None if r.get("share_of_peak") is None else f"{r['share_of_peak'] * 100:.1f}%"),
    Column("peak mem GiB", "peak_memory_gib", ".2f"), Column("notes", "note", align="<"),
)


def show(report: dict) -> None:
    """The results as a fixed-width table."""
    m, report = report["machine"], report["figures"]
    f = report.get("flops") or {}
    print(f"\nUNet {report['parameters']:,} params ({report['model_source']}), {report['settings']['precision']}, "
          f"device {m['device']} {m.get('gpu') or ''}, torch {m['torch']}; peak bf16 dense "
          f"{_fmt(report['peak_bf16_dense_tflops'], '.0f')} TFLOP/s ({report['peak_source']})")
    if f:
        print(f"FLOPs per image: training step {f['flops_per_image'] / 1e9:.3f} GFLOP, "
              f"forward {f['forward_flops_per_image'] / 1e9:.3f} GFLOP")
    print_table([{"key": key, "failed": True, "note": report["errors"].get(key.replace("_", " "), "")[:60]}
                 if r is None else {**r, "key": key, "note": _note(key, r)}
                 for key, r in report["results"].items()], COLUMNS)
    for name, error in report["errors"].items():
        print(f"error in {name}: {error[:300]}")
    best, met = report["best_training_images_per_s"], report["target_met"]
    if met is not None:
        print(f"target >= {report['target_training_images_per_s']:,.0f} training images/s: "
              f"{'MET' if met else 'NOT MET'} (best {best:,.1f})")
    if report["profile"]:
        kinds = report["profile"]["kernel_ms_per_step_by_kind"]
        if kinds:
            print("GPU kernel ms per step by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()))
    print(f"wall time {report['wall_s']:.1f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run, print the table, write the JSON and print its path."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    load_start = load_average_1m()
    figures = run(args)
    report = build_report(SCRIPT, argv, figures.pop("machine"), load_start, figures)
    show(report)
    print(f"wrote {write_report(args.output, report)}", flush=True)


if __name__ == "__main__":
    main()
