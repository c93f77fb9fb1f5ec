"""diffusion_core: the DDPM math (Ho et al. 2020), the UNet, samplers and the exact likelihood.

Public API (docs/ARCHITECTURE.md): ``DiffusionConfig``, ``GaussianDiffusion``, ``UNet``, ``UNetConfig``;
also ``RowGenerators`` (one random generator per group of rows of a batch, ``diffusion_core.rng``).
Layers: ``process`` (``DiffusionProcess``: coefficients, q, p from a model output, parameterizations,
score) at the bottom; ``bound``, ``losses`` and the samplers (``diffusion_core.samplers``) on its
public names; ``GaussianDiffusion`` (``diffusion``) the validated facade over them.
Samplers, all methods of ``GaussianDiffusion``, described once in ``diffusion_core.samplers.registry``:
``p_sample_loop`` (ancestral DDPM), ``ddim_sample_loop`` (DDIM, spacing "uniform" | "quadratic" |
"logsnr"), ``pc_sample_loop`` (predictor-corrector, Song et al. 2021), ``langevin_sample_loop``
(annealed Langevin dynamics, Song & Ermon 2019), ``dpm_solver_sample_loop`` (DPM-Solver++
multistep, Lu et al. 2022) and ``edm_heun_sample_loop`` (EDM's Heun sampler, Karras et al. 2022);
``network_evaluations`` gives the model calls of each.
Predictions: "eps", "x_start", "v" and "score". Class-conditional models (``UNetConfig.num_classes``)
and classifier-free guidance (Ho & Salimans 2022): ``diffusion_core.guidance``.
This package imports neither Ray nor MLflow and does no I/O beyond the checkpoints it is handed.
Names are resolved lazily (PEP 562) so that ``import diffusion_core.images`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DiffusionConfig": "diffusion_core.config",
    "UNetConfig": "diffusion_core.config",
    "GaussianDiffusion": "diffusion_core.diffusion",
    "UNet": "diffusion_core.unet",
    "RowGenerators": "diffusion_core.rng",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffusion_core' has no attribute {name!r}")
