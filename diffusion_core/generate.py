"""One entry point for drawing images with any of the core's samplers, chosen by name.

Every place that samples (training's sample grids, ``pipelines/evaluate.py``, the MLflow pyfunc,
the Serve replica) describes what to run as a :class:`SamplerSettings` and calls :func:`generate`,
so a sampler added to ``GaussianDiffusion`` is offered everywhere by adding it here.

Samplers (``diffusion_core.sampling``; cost in network evaluations per image from
:func:`diffusion_core.sampling.network_evaluations`, S = ``num_steps``, M = ``corrector_steps``):

* ``"ddpm"``: ancestral sampling, Ho et al. 2020 Alg. 2 (``p_sample_loop``); always T evaluations.
* ``"ddim"``: Song et al. 2021 eq. 12 (``ddim_sample_loop``) with ``eta`` and ``spacing``; S.
* ``"pc"``: predictor-corrector, Song et al. 2021 (SDEs) Alg. 1/5 (``pc_sample_loop``); S (1 + M).
* ``"langevin"``: annealed Langevin dynamics, Song & Ermon 2019 (``langevin_sample_loop``); S M + 1.
* ``"dpm_solver"``: DPM-Solver++ 1/2M, Lu et al. 2022 (``dpm_solver_sample_loop``) with ``order``
  and ``algorithm`` (the ODE "dpmsolver++" or the SDE "sde-dpmsolver++"); S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from diffusion_core import sampling
from diffusion_core.diffusion import Model
from diffusion_core.rng import Generator
from diffusion_core.sampling import DPMAlgorithm
from diffusion_core.timesteps import Spacing
from diffusion_core.validation import (
    check_bool,
    check_choice,
    check_int_in_range,
    check_number_in,
    check_positive_int,
)

SamplerName = Literal["ddpm", "ddim", "pc", "langevin", "dpm_solver"]

DEFAULT_SPACING: dict[str, str] = {"ddpm": "uniform", "ddim": "uniform", "pc": "uniform", "langevin": "uniform",
                                   "dpm_solver": "logsnr"}
"""The spacing each sampler uses when ``SamplerSettings.spacing`` is ``None`` (the core loops' defaults;
DDPM visits every timestep, so its entry only fills the field)."""

_USES: dict[str, tuple[str, ...]] = {
    "ddpm": (),
    "ddim": ("num_steps", "eta", "spacing"),
    "pc": ("num_steps", "spacing", "corrector_steps", "snr"),
    "langevin": ("num_steps", "spacing", "corrector_steps", "snr"),
    "dpm_solver": ("num_steps", "spacing", "order", "algorithm"),
}


@dataclass(frozen=True)
class SamplerSettings:
    """Which sampler to run and how; fields a sampler does not use are ignored by it (see
    :meth:`uses`).

    Attributes:
        sampler: "ddpm", "ddim", "pc", "langevin" or "dpm_solver" (see the module docstring).
        num_steps: S >= 1, the steps (noise levels) of every sampler but "ddpm" (which runs all T);
            at most T of the model sampled (checked by :meth:`network_evaluations` and the sampler).
        eta: DDIM's stochasticity, >= 0 (0 = deterministic); "ddim" only.
        clip_denoised: clamp the predicted x_0 to [-1, 1] at every step.
        spacing: which timesteps the S steps visit, "uniform", "quadratic" or "logsnr"
            (``diffusion_core.timesteps``); ``None`` becomes the sampler's default
            (``DEFAULT_SPACING``: "logsnr" for "dpm_solver", else "uniform"), so a constructed
            settings object always holds a concrete spacing.
        corrector_steps: M, Langevin steps per noise level; >= 0 for "pc" (0: the predictor
            alone), >= 1 for "langevin".
        snr: the Langevin step's signal-to-noise ratio r > 0 ("pc", "langevin"; 0.16 in Song et al.
            2021 for CIFAR-10).
        order: 1 or 2, DPM-Solver++'s order ("dpm_solver"; 1 is DDIM with eta = 0).
        algorithm: "dpmsolver++" (the probability-flow ODE) or "sde-dpmsolver++" (the reverse SDE,
            stochastic: order 1 is DDIM with eta = 1) ("dpm_solver").

    Raises:
        ValueError: naming the field, on an unknown sampler or spacing, ``num_steps < 1``,
            ``eta < 0``, a ``corrector_steps`` below the sampler's minimum, ``snr <= 0`` (or not
            finite), ``order`` not in {1, 2}, an unknown ``algorithm``, or a non-bool ``clip_denoised``.
    """

    sampler: SamplerName = "ddim"
    num_steps: int = 50
    eta: float = 0.0
    clip_denoised: bool = True
    spacing: Spacing | None = None
    corrector_steps: int = 1
    snr: float = 0.16
    order: int = 2
    algorithm: DPMAlgorithm = "dpmsolver++"

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SamplerName)
        check_positive_int("num_steps", self.num_steps)
        check_number_in("eta", self.eta, 0.0, float("inf"), high_open=True)
        check_bool("clip_denoised", self.clip_denoised)
        if self.spacing is None:
            object.__setattr__(self, "spacing", DEFAULT_SPACING[self.sampler])
        check_choice("spacing", self.spacing, Spacing)
        check_int_in_range("corrector_steps", self.corrector_steps, 1 if self.sampler == "langevin" else 0,
                           why=" for sampler 'langevin'" if self.sampler == "langevin" else "")
        check_number_in("snr", self.snr, 0.0, float("inf"), low_open=True, high_open=True)
        check_int_in_range("order", self.order, 1, 2)
        check_choice("algorithm", self.algorithm, DPMAlgorithm)

    def uses(self) -> tuple[str, ...]:
        """The names of the parameters (besides ``sampler`` and ``clip_denoised``) this sampler uses."""
        return _USES[self.sampler]

    def params(self) -> dict[str, Any]:
        """``{"sampler", "clip_denoised", and each field of :meth:`uses`: value}``: what describes
        this run (MLflow params, HTTP response metadata, grouping keys); unused fields are left out."""
        return {"sampler": self.sampler, **{name: getattr(self, name) for name in self.uses()},
                "clip_denoised": self.clip_denoised}

    def network_evaluations(self, num_timesteps: int) -> int:
        """Network evaluations (model calls on the whole batch) per image of one :func:`generate`
        call for a model with T = ``num_timesteps`` timesteps: T for "ddpm", else
        :func:`diffusion_core.sampling.network_evaluations` of ``num_steps`` (S, S (1 + M) or S M + 1).

        Raises:
            ValueError: naming ``num_steps`` if it is more than T (for a sampler that uses it), or
                on ``num_timesteps < 1``.
        """
        check_positive_int("num_timesteps", num_timesteps)
        if self.sampler == "ddpm":
            return sampling.network_evaluations("ddpm", num_timesteps)
        check_int_in_range("num_steps", self.num_steps, 1, num_timesteps, why=f" (the model's T={num_timesteps})")
        corrector_steps = self.corrector_steps if "corrector_steps" in self.uses() else 0
        return sampling.network_evaluations(self.sampler, self.num_steps, corrector_steps)


def generate(
    diffusion, model: Model, shape: tuple[int, int, int, int], settings: SamplerSettings,
    generator: Generator = None, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``shape`` = [N, C, H, W] images with ``settings``, without gradients.

    Dispatches by ``settings.sampler`` to ``GaussianDiffusion.p_sample_loop``, ``ddim_sample_loop``,
    ``pc_sample_loop``, ``langevin_sample_loop`` or ``dpm_solver_sample_loop``, passing the
    parameters that sampler uses by keyword; the result is exactly that call's.

    Args:
        diffusion: a ``GaussianDiffusion``.
        model: the network ``model(x_t, t)``, in eval mode, on ``device``.
        shape: [N, C, H, W] of the result.
        settings: the sampler and its parameters.
        generator: a ``torch.Generator`` or a ``RowGenerators`` (one generator per group of rows);
            the same seed gives the same images on the same hardware.
        device: where to sample (default: the sampler's default).

    Returns:
        float32 [N, C, H, W] (in [-1, 1] when ``clip_denoised``), on ``device``.

    Raises:
        ValueError: from the sampler on values that do not fit the diffusion (e.g. num_steps > T).
    """
    common = {"generator": generator, "clip_denoised": settings.clip_denoised, "device": device}
    with torch.no_grad():
        if settings.sampler == "ddpm":
            return diffusion.p_sample_loop(model, shape, **common)
        if settings.sampler == "ddim":
            return diffusion.ddim_sample_loop(model, shape, num_steps=settings.num_steps, eta=settings.eta,
                                              spacing=settings.spacing, **common)
        if settings.sampler in ("pc", "langevin"):
            loop = diffusion.pc_sample_loop if settings.sampler == "pc" else diffusion.langevin_sample_loop
            return loop(model, shape, num_steps=settings.num_steps, corrector_steps=settings.corrector_steps,
                        snr=settings.snr, spacing=settings.spacing, **common)
        return diffusion.dpm_solver_sample_loop(model, shape, num_steps=settings.num_steps, order=settings.order,
                                                spacing=settings.spacing, algorithm=settings.algorithm, **common)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """``torch.Generator(device).manual_seed(seed)``: the generator every seeded entry point uses."""
    return torch.Generator(device=device).manual_seed(int(seed))
