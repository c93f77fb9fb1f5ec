"""One entry point for drawing images with any of the core's samplers, chosen by name.

Every place that samples (training's sample grids, ``pipelines/evaluate.py``, the MLflow pyfunc,
the Serve replica) describes what to run as a :class:`SamplerSettings` and calls :func:`generate`.
Both read the sampler registry (``diffusion_core.samplers.registry``: each sampler's parameters,
defaults, cost and ``GaussianDiffusion`` method), so a sampler added there is offered everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from diffusion_core.guidance import (
    GuidanceInterval,
    as_class_labels,
    check_guidance_interval,
    check_guidance_scale,
    classifier_free_guidance,
    guidance_evaluations,
    model_num_classes,
)
from diffusion_core.rng import Generator
from diffusion_core.samplers.common import network_evaluations
from diffusion_core.samplers.registry import (
    ALGORITHM,
    CORRECTOR_STEPS,
    DEFAULT_SAMPLER,
    ETA,
    NUM_STEPS,
    ORDER,
    SAMPLERS,
    SNR,
    DPMAlgorithm,
    SamplerName,
    Spacing,
)
from diffusion_core.types import Model
from diffusion_core.validation import (
    check_bool,
    check_choice,
    check_int_in_range,
    check_number_in,
    check_positive_int,
)


@dataclass(frozen=True)
class SamplerSettings:
    """Which sampler to run and how; fields a sampler does not use are ignored by it (see
    :meth:`uses`). Defaults, ranges and the samplers themselves are the registry's
    (``diffusion_core.samplers.registry``).

    Attributes:
        sampler: a name of the registry: "ddpm", "ddim", "pc", "langevin", "dpm_solver" or "edm_heun".
        num_steps: S >= 1, the steps (noise levels) of every sampler but "ddpm" (which runs all T);
            at most T of the model sampled (checked by :meth:`network_evaluations` and the sampler).
        eta: DDIM's stochasticity, >= 0 (0 = deterministic); "ddim" only.
        clip_denoised: clamp the predicted x_0 to [-1, 1] at every step.
        spacing: which timesteps the S steps visit, "uniform", "quadratic" or "logsnr"
            (``diffusion_core.timesteps``); ``None`` becomes the sampler's ``default_spacing``
            ("logsnr" for "dpm_solver", else "uniform"), so a constructed settings object always
            holds a concrete spacing.
        corrector_steps: M, Langevin steps per noise level; at least the sampler's
            ``min_corrector_steps`` (>= 0 for "pc", 0: the predictor alone; >= 1 for "langevin").
        snr: the Langevin step's signal-to-noise ratio r > 0 ("pc", "langevin").
        order: 1 or 2, DPM-Solver++'s order ("dpm_solver"; 1 is DDIM with eta = 0).
        algorithm: "dpmsolver++" (the probability-flow ODE) or "sde-dpmsolver++" (the reverse SDE,
            stochastic: order 1 is DDIM with eta = 1) ("dpm_solver").

    Raises:
        ValueError: naming the field, on an unknown sampler or spacing, ``num_steps < 1``,
            ``eta < 0``, a ``corrector_steps`` below the sampler's minimum, ``snr <= 0`` (or not
            finite), ``order`` not in {1, 2}, an unknown ``algorithm``, or a non-bool ``clip_denoised``.
    """

    sampler: SamplerName = DEFAULT_SAMPLER
    num_steps: int = NUM_STEPS.default
    eta: float = ETA.default
    clip_denoised: bool = True
    spacing: Spacing | None = None
    corrector_steps: int = CORRECTOR_STEPS.default
    snr: float = SNR.default
    order: int = ORDER.default
    algorithm: DPMAlgorithm = ALGORITHM.default

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SamplerName)
        spec = SAMPLERS[self.sampler]
        check_positive_int("num_steps", self.num_steps)
        check_number_in("eta", self.eta, ETA.low, ETA.high, low_open=ETA.low_open, high_open=ETA.high_open)
        check_bool("clip_denoised", self.clip_denoised)
        if self.spacing is None:
            object.__setattr__(self, "spacing", spec.default_spacing)
        check_choice("spacing", self.spacing, Spacing)
        least = spec.min_corrector_steps if "corrector_steps" in spec.parameters else CORRECTOR_STEPS.low
        check_int_in_range("corrector_steps", self.corrector_steps, least,
                           why=f" for sampler {self.sampler!r}" if least > CORRECTOR_STEPS.low else "")
        check_number_in("snr", self.snr, SNR.low, SNR.high, low_open=SNR.low_open, high_open=SNR.high_open)
        check_int_in_range("order", self.order, ORDER.low, ORDER.high)
        check_choice("algorithm", self.algorithm, DPMAlgorithm)

    def uses(self) -> tuple[str, ...]:
        """The names of the parameters (besides ``sampler`` and ``clip_denoised``) this sampler uses,
        the registry's ``SamplerSpec.parameters``."""
        return SAMPLERS[self.sampler].parameters

    def params(self) -> dict[str, Any]:
        """``{"sampler", "clip_denoised", and each field of :meth:`uses`: value}``: what describes
        this run (MLflow params, HTTP response metadata, grouping keys); unused fields are left out."""
        return {"sampler": self.sampler, **{name: getattr(self, name) for name in self.uses()},
                "clip_denoised": self.clip_denoised}

    def network_evaluations(self, num_timesteps: int) -> int:
        """Network evaluations (model calls on the whole batch) per image of one :func:`generate`
        call for a model with T = ``num_timesteps`` timesteps: T for "ddpm", else the registry's
        cost of ``num_steps`` (S, S (1 + M), S M + 1 or 2 S - 1; M counts only for the samplers that
        take it).

        Raises:
            ValueError: naming ``num_steps`` if it is more than T (for a sampler that uses it), or
                on ``num_timesteps < 1``.
        """
        check_positive_int("num_timesteps", num_timesteps)
        if "num_steps" not in self.uses():
            return network_evaluations(self.sampler, num_timesteps)
        check_int_in_range("num_steps", self.num_steps, 1, num_timesteps, why=f" (the model's T={num_timesteps})")
        corrector_steps = self.corrector_steps if "corrector_steps" in self.uses() else 0
        return network_evaluations(self.sampler, self.num_steps, corrector_steps)


def generate(
    diffusion, model: Model, shape: tuple[int, int, int, int], settings: SamplerSettings,
    generator: Generator = None, device: torch.device | str | None = None,
    class_labels: torch.Tensor | Sequence[int] | None = None, guidance_scale: float = 1.0,
    guidance_interval: GuidanceInterval | None = None,
) -> torch.Tensor:
    """Draw ``shape`` = [N, C, H, W] images with ``settings``, without gradients.

    Calls the sampler's ``GaussianDiffusion`` method (the registry's ``SamplerSpec.method``:
    ``p_sample_loop``, ``ddim_sample_loop``, ``pc_sample_loop``, ``langevin_sample_loop``,
    ``dpm_solver_sample_loop`` or ``edm_heun_sample_loop``) with the parameters that sampler uses,
    by keyword; the result is exactly that call's. With ``class_labels`` the model is first wrapped in
    ``diffusion_core.guidance.classifier_free_guidance(model, class_labels, guidance_scale,
    diffusion.process)`` (Ho & Salimans 2022): each model call of the sampler then costs
    ``guidance_evaluations(guidance_scale)`` (1 for s in {0, 1}, else 2) network evaluations per
    image, i.e. ``settings.network_evaluations(T) * guidance_evaluations(guidance_scale)`` in all
    (fewer with a ``guidance_interval``: calls at unguided timesteps cost 1).

    Args:
        diffusion: a ``GaussianDiffusion``.
        model: the network ``model(x_t, t)`` (or ``model(x_t, t, class_labels)`` for a
            class-conditional one), in eval mode, on ``device``.
        shape: [N, C, H, W] of the result.
        settings: the sampler and its parameters.
        generator: a ``torch.Generator`` or a ``RowGenerators`` (one generator per group of rows);
            the same seed gives the same images on the same hardware.
        device: where to sample (default: the sampler's default).
        class_labels: ``None`` (unlabelled: ``model(x_t, t)``, which a conditional model reads as
            "no label" for every row) or int64 [N] (or N ints) in [-1, K) for a conditional model,
            -1 = no label (those rows are sampled unconditionally whatever the scale).
        guidance_scale: s, finite and >= 0, diffusers' convention: 1 = the conditional model,
            0 = the unconditional one, > 1 guides (Ho & Salimans' w = s - 1). Checked always; it
            has no effect without ``class_labels``.
        guidance_interval: ``(sigma_lo, sigma_hi)``: guide only the steps with sigma_lo < sigma_t
            <= sigma_hi, sigma_t = sqrt(1 / abar_t - 1) (Kynkaanniemi et al. 2024), the others use
            the conditional model; ``None`` guides every step. Checked when ``class_labels`` are given.

    Returns:
        float32 [N, C, H, W] (in [-1, 1] when ``clip_denoised``), on ``device``.

    Raises:
        ValueError: from the sampler on values that do not fit the diffusion (e.g. num_steps > T);
            naming ``guidance_scale`` if it is not finite and >= 0; naming ``guidance_interval`` if it
            is not a valid interval; naming ``class_labels`` if they
            are out of range, are not N, or are given for an unconditional model.
    """
    check_guidance_scale(guidance_scale)
    if class_labels is not None:
        labels = as_class_labels(class_labels, model_num_classes(model))
        if labels.shape[0] != shape[0]:
            raise ValueError(f"class_labels has {labels.shape[0]} labels but shape {tuple(shape)} asks for "
                             f"N = {shape[0]} images; give one label per image")
        model = classifier_free_guidance(model, labels, guidance_scale, diffusion.process, guidance_interval)
    loop = getattr(diffusion, SAMPLERS[settings.sampler].method)
    parameters = {name: getattr(settings, name) for name in settings.uses()}
    with torch.no_grad():
        return loop(model, shape, generator=generator, clip_denoised=settings.clip_denoised, device=device,
                    **parameters)


def guided_network_evaluations(
    diffusion, settings: SamplerSettings, guidance_scale: float, guidance_interval: GuidanceInterval | None = None,
) -> int:
    """Network evaluations per image of one :func:`generate` call with class labels, guidance scale s
    = ``guidance_scale`` and ``guidance_interval``: a doubled batch counts 2 per image.

    Without an interval (or for s in {0, 1}) this is ``settings.network_evaluations(T) *
    guidance_evaluations(s)``. With one, each model call at a guided timestep (``guided_timesteps``,
    Kynkaanniemi et al. 2024) counts 2 and every other call 1; which timesteps a sampler calls the
    network at does not depend on the network's output, so they are counted on a dry run of the sampler
    on one [1, 1, 2, 2] image with a stand-in network that records its batch size and returns zeros
    (no real network runs; milliseconds for T = 1000).

    Args:
        diffusion: a ``GaussianDiffusion``.
        settings: the sampler and its parameters.
        guidance_scale: s, finite and >= 0.
        guidance_interval: ``(sigma_lo, sigma_hi)`` or ``None`` (every step guided).

    Returns:
        int >= 1.

    Raises:
        ValueError: naming ``guidance_scale`` / ``guidance_interval`` on invalid values, or from
            ``settings.network_evaluations`` (e.g. num_steps > T).
    """
    per_call = guidance_evaluations(guidance_scale)
    evaluations = settings.network_evaluations(diffusion.num_timesteps)
    if guidance_interval is None or per_call == 1:
        return evaluations * per_call
    check_guidance_interval(guidance_interval)
    batch_sizes: list[int] = []
    channels = 2 if diffusion.config.learn_sigma else 1

    def stand_in(x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        batch_sizes.append(x_t.shape[0])
        return x_t.new_zeros(x_t.shape[0], channels, *x_t.shape[2:])

    generate(diffusion, stand_in, (1, 1, 2, 2), settings, generator=seeded_generator(0), class_labels=[0],
             guidance_scale=guidance_scale, guidance_interval=guidance_interval)
    return sum(batch_sizes)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """``torch.Generator(device).manual_seed(seed)``: the generator every seeded entry point uses."""
    return torch.Generator(device=device).manual_seed(int(seed))
