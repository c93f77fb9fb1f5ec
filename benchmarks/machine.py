"""The machine a benchmark ran on, for its JSON: needs only torch and the standard library, so the
GPU benchmark can use it on a bare CUDA machine."""

from __future__ import annotations

import os
import platform

import torch


def machine_info(device: torch.device) -> dict:
    """CPU count, Python and torch versions, torch threads, platform, OMP_WAIT_POLICY, CUDA/cuDNN
    versions and, on a GPU, its name, memory (GiB), SM count and compute capability. ``report``
    adds the load average."""
    info = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": str(device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_sm_count=props.multi_processor_count, gpu_capability=f"{props.major}.{props.minor}")
    return info
