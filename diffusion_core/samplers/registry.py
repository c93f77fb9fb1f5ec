"""The sampler registry: the one description of every sampler the project offers, free of torch.

Each :class:`SamplerSpec` gives a sampler's name, the ``GaussianDiffusion`` loop that runs it, the
parameters it takes (each a :class:`Parameter` with its default and allowed range), its default
timestep spacing and number of steps, its cost in network evaluations and its paper. Everything
that names samplers reads this module: ``GaussianDiffusion``'s loop defaults,
``diffusion_core.generate`` (``SamplerSettings`` and the dispatch of ``generate``), the Serve request
schema (``deploy/``, which validates requests without torch), the MLflow pyfunc's request model,
``pipelines/evaluate.py``'s flags and ``benchmarks/bench_samplers.py``.

Conventions (docs/ARCHITECTURE.md): S = ``num_steps`` (noise levels a sampler visits, 1 <= S <= T),
M = ``corrector_steps``, T = the model's timesteps; a cost counts model calls on the whole batch,
i.e. network evaluations per image. Adding a sampler is its loop (``diffusion_core/samplers/``), a
``GaussianDiffusion`` method that forwards to it, and one entry of :data:`SAMPLERS`
(docs/ARCHITECTURE.md, "Adding a sampler").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Union, get_args

Spacing = Literal["uniform", "quadratic", "logsnr"]
"""Which timesteps a few-step sampler visits (``diffusion_core.timesteps.sampling_timesteps``)."""

DPMAlgorithm = Literal["dpmsolver++", "sde-dpmsolver++"]
"""DPM-Solver++'s two forms (diffusers' ``algorithm_type`` names): the ODE, and the reverse SDE."""

Value = Union[int, float, str]


@dataclass(frozen=True)
class Parameter:
    """One sampler parameter and the values it may take.

    Attributes:
        name: the keyword of the loop and the field of ``SamplerSettings`` and of the requests.
        default: its value when a caller leaves it out.
        kind: ``int``, ``float`` or ``str``.
        low, high: the allowed range of a number (``None``: unbounded on that side).
        low_open, high_open: whether ``low`` / ``high`` themselves are excluded.
        choices: the allowed strings of a ``str`` parameter.
        help: one line for command-line flags and schemas.
    """

    name: str
    default: Value
    kind: type
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()


NUM_STEPS = Parameter("num_steps", 50, int, "S, the steps (noise levels) the sampler visits, at most the model's T",
                      low=1)
ETA = Parameter("eta", 0.0, float, "DDIM's stochasticity (0: deterministic DDIM, 1: DDPM-like noise)",
                low=0.0, high=float("inf"), high_open=True)
SPACING = Parameter("spacing", "uniform", str, "which timesteps the steps visit", choices=get_args(Spacing))
CORRECTOR_STEPS = Parameter("corrector_steps", 1, int, "M, Langevin corrector steps per noise level", low=0)
SNR = Parameter("snr", 0.16, float, "signal-to-noise ratio r of the Langevin steps (default: Song et al. 2021's "
                "for CIFAR-10)", low=0.0, high=float("inf"), low_open=True, high_open=True)
ORDER = Parameter("order", 2, int, "DPM-Solver++ order, 1 or 2", low=1, high=2)
ALGORITHM = Parameter("algorithm", "dpmsolver++", str,
                      "DPM-Solver++ form: the ODE (dpmsolver++) or the reverse SDE (sde-dpmsolver++)",
                      choices=get_args(DPMAlgorithm))

PARAMETERS: dict[str, Parameter] = {p.name: p for p in (NUM_STEPS, ETA, SPACING, CORRECTOR_STEPS, SNR, ORDER, ALGORITHM)}
"""Every sampler parameter by name, in the order of ``SamplerSettings``' fields."""


def _steps(num_steps: int, corrector_steps: int, num_timesteps: int) -> int:
    """S: one evaluation per step."""
    return num_steps


def _all_timesteps(num_steps: int, corrector_steps: int, num_timesteps: int) -> int:
    """T: one evaluation per timestep of the model."""
    return num_timesteps


def _predictor_corrector(num_steps: int, corrector_steps: int, num_timesteps: int) -> int:
    """S (1 + M): a predictor and M corrector evaluations per level."""
    return num_steps * (1 + corrector_steps)


def _annealed_langevin(num_steps: int, corrector_steps: int, num_timesteps: int) -> int:
    """S M + 1: M corrector evaluations per level, then one denoising evaluation."""
    return num_steps * corrector_steps + 1


def _heun(num_steps: int, corrector_steps: int, num_timesteps: int) -> int:
    """2 S - 1: two evaluations per Heun step, one for the last (an Euler step to sigma = 0)."""
    return 2 * num_steps - 1


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler.

    Attributes:
        name: its name in ``SamplerSettings.sampler``, HTTP requests and flags.
        method: the ``GaussianDiffusion`` method that runs it (``model, shape, **parameters``).
        parameters: the names of the :data:`PARAMETERS` it takes, in the order they are reported
            (``SamplerSettings.params()``); ``clip_denoised`` is taken by every sampler.
        cost: its network evaluations per image, ``cost(S, M, T)``.
        reference: the paper (and algorithm or equation) it implements.
        summary: one line on what it does.
        default_num_steps: S when a request leaves ``num_steps`` out (at most T); ``None`` for a
            sampler that always visits all T timesteps.
        default_spacing: the spacing when none is given.
        min_corrector_steps: the fewest corrector steps it accepts (when it takes them).
    """

    name: str
    method: str
    parameters: tuple[str, ...]
    cost: Callable[[int, int, int], int]
    reference: str
    summary: str
    default_num_steps: int | None = 50
    default_spacing: str = "uniform"
    min_corrector_steps: int = 0


SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("ddpm", "p_sample_loop", (), _all_timesteps, "Ho et al. 2020, Algorithm 2",
                "ancestral sampling over all T timesteps", default_num_steps=None),
    SamplerSpec("ddim", "ddim_sample_loop", ("num_steps", "eta", "spacing"), _steps,
                "Song et al. 2021 (DDIM), eq. 12", "DDIM over S timesteps, deterministic at eta = 0"),
    SamplerSpec("pc", "pc_sample_loop", ("num_steps", "spacing", "corrector_steps", "snr"), _predictor_corrector,
                "Song et al. 2021 (score-based SDEs), Alg. 1 with the corrector of Alg. 5",
                "predictor-corrector: ancestral predictor, Langevin corrector"),
    SamplerSpec("langevin", "langevin_sample_loop", ("num_steps", "spacing", "corrector_steps", "snr"),
                _annealed_langevin, "Song & Ermon 2019, Alg. 1", "annealed Langevin dynamics over the noise levels",
                min_corrector_steps=1),
    SamplerSpec("dpm_solver", "dpm_solver_sample_loop", ("num_steps", "spacing", "order", "algorithm"), _steps,
                "Lu et al. 2022 (DPM-Solver++), Alg. 2", "DPM-Solver++ 1/2M, the ODE or the reverse SDE",
                default_num_steps=20, default_spacing="logsnr"),
    SamplerSpec("edm_heun", "edm_heun_sample_loop", ("num_steps",), _heun,
                "Karras et al. 2022 (EDM), Alg. 1 on the noise levels of eq. 5 (rho = 7)",
                "EDM's deterministic Heun (2nd order) solver of the probability-flow ODE",
                default_num_steps=18),
)}
"""Every sampler by name."""

SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]  # the names of SAMPLERS, as a Literal type
DEFAULT_SAMPLER = "ddim"
"""The sampler of a request, flag or ``SamplerSettings`` that names none."""


def takers(parameter: str) -> list[str]:
    """The names of the samplers that take ``parameter``, in registry order."""
    return [spec.name for spec in SAMPLERS.values() if parameter in spec.parameters]
