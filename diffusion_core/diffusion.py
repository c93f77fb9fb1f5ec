"""GaussianDiffusion: the one object callers need for the DDPM math (Ho et al. 2020, with the
improvements of Nichol & Dhariwal 2021): the validated public API over the layers below.

Layers (docs/ARCHITECTURE.md): ``process.py`` (:class:`~diffusion_core.process.DiffusionProcess`:
coefficients, q, its posterior, p from a model output, parameterizations, score; unchecked) at the
bottom; ``bound.py``, ``losses.py`` and the samplers (``diffusion_core/samplers/``) on its public
names; this facade on top. Each method here checks its inputs once and forwards to the layer that
owns the math; the schedule arrays and the parameterization conversions (``betas``,
``alphas_cumprod``, ``extract``, ``predict_xstart_from_eps``, ...) are the process's, read through.

Conventions: timesteps are 0-based (index ``t`` in [0, T) is the paper's ``t + 1``), ``t`` is an
int64 tensor [N], images are float tensors [N, C, H, W], and ``model`` is any callable
``model(x_t [N,C,H,W], t [N] int64) -> [N, C_out, H, W]`` with ``C_out = C``, or ``2C`` for
``variance="learned_range"``. Sampler defaults come from ``diffusion_core.samplers.registry``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from diffusion_core import bound, losses, rng
from diffusion_core.config import DiffusionConfig
from diffusion_core.process import DiffusionProcess
from diffusion_core.samplers import ancestral, common, ddim, dpm_solver, edm, score_based
from diffusion_core.samplers.registry import ALGORITHM, CORRECTOR_STEPS, ETA, ORDER, SAMPLERS, SNR
from diffusion_core.types import DenoisedFn, Model, Progress
from diffusion_core.validation import check_same_shape

_DDIM, _DPM_SOLVER, _EDM_HEUN = SAMPLERS["ddim"], SAMPLERS["dpm_solver"], SAMPLERS["edm_heun"]


class GaussianDiffusion:
    """The DDPM math for one :class:`DiffusionConfig`, independent of the network.

    Attributes:
        process: the :class:`DiffusionProcess` of ``config``.
        config, num_timesteps, and the float64 numpy schedule arrays [T] (``betas``, ``alphas``,
        ``alphas_cumprod``, ``alphas_cumprod_prev``, ``posterior_variance``,
        ``posterior_log_variance_clipped``, ...): the process's (see :class:`DiffusionProcess`),
        as are ``extract``, ``check_inputs``, the ``predict_*`` conversions,
        ``xstart_and_eps_from_output``, ``output_from_eps`` and ``training_target``.

    Raises:
        TypeError: if ``config`` is not a DiffusionConfig.
        ValueError: if the schedule is invalid for T (see ``schedule.py``).
    """

    def __init__(self, config: DiffusionConfig) -> None:
        if not isinstance(config, DiffusionConfig):
            raise TypeError(f"GaussianDiffusion expects a DiffusionConfig, got {type(config).__name__}")
        self.process = DiffusionProcess(config)

    def __getattr__(self, name: str) -> Any:
        """The process's public attributes (schedule arrays, ``config``, conversions), read through.
        Only called for names this class does not define."""
        if name.startswith("_") or name == "process":  # also while unpickling, before ``process`` is set
            raise AttributeError(name)
        return getattr(self.process, name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | {n for n in dir(self.process) if not n.startswith("_")})

    def __repr__(self) -> str:
        return f"GaussianDiffusion({self.config!r})"

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
        (Ho et al. 2020, eq. 4).

        Args:
            x_start: x_0, float [N, C, H, W] in [-1, 1].
            t: int64 [N], 0-based timesteps in [0, T).

        Returns:
            (mean, variance, log_variance), each [N, C, H, W] with x_start's dtype.

        Raises:
            ValueError: on a bad shape/dtype or a timestep outside [0, T).
        """
        self.process.check_inputs(x_start, t, "x_start")
        return self.process.q_mean_variance(x_start, t)

    def q_sample(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        generator: rng.Generator = None,
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): ``sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` (Ho et al. eq. 4).

        Args:
            x_start: x_0, float [N, C, H, W].
            t: int64 [N], 0-based timesteps in [0, T).
            noise: eps ~ N(0, I) with x_start's shape; drawn with ``generator`` when None.
            generator: optional torch.Generator (on x_start's device) or ``rng.RowGenerators``
                for the drawn noise.

        Returns:
            x_t, [N, C, H, W] with x_start's dtype.

        Raises:
            ValueError: on bad shapes/dtypes, a noise shape different from x_start's, or t outside [0, T).
        """
        self.process.check_inputs(x_start, t, "x_start")
        if noise is None:
            noise = rng.randn(x_start.shape, generator, device=x_start.device, dtype=x_start.dtype)
        check_same_shape(noise, x_start, "noise", "x_start")
        return self.process.q_sample(x_start, t, noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of the forward-process posterior
        q(x_{t-1} | x_t, x_0) = N(mu-tilde_t, beta-tilde_t I) (Ho et al. 2020, eqs. 6-7).

        Args:
            x_start: x_0, float [N, C, H, W].
            x_t: float [N, C, H, W].
            t: int64 [N], 0-based timesteps in [0, T). At t = 0 the mean is x_0 and the variance 0
                (the log-variance is the clipped value log beta-tilde at index 1).

        Returns:
            (mean, variance, log_variance), each [N, C, H, W].

        Raises:
            ValueError: on bad/mismatched shapes or t outside [0, T).
        """
        self.process.check_inputs(x_t, t)
        check_same_shape(x_start, x_t, "x_start", "x_t")
        return self.process.q_posterior_mean_variance(x_start, x_t, t)

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self,
        model: Model,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        denoised_fn: DenoisedFn = None,
    ) -> dict[str, torch.Tensor]:
        """Run the model and form p(x_{t-1} | x_t) = N(mean, variance) (Ho et al. 2020, eqs. 1, 11;
        see :meth:`DiffusionProcess.p_mean_variance_from_output` for the mean and the variances).

        Args:
            model: callable (x_t, t) -> [N, C or 2C, H, W].
            x_t: float [N, C, H, W].
            t: int64 [N], 0-based timesteps in [0, T).
            clip_denoised: clamp pred_xstart to [-1, 1] and recompute mean and pred_eps from it.
            denoised_fn: optional map applied to pred_xstart before clipping (pred_eps and the
                mean are then recomputed from its result).

        Returns:
            dict with "mean", "variance", "log_variance", "pred_xstart", "pred_eps" (each
            [N, C, H, W]) and "model_output" (the raw first C channels).

        Raises:
            ValueError: on bad shapes, t outside [0, T), or a model output with the wrong shape
                (expects 2C channels for learned_range, C otherwise).
        """
        self.process.check_inputs(x_t, t)
        return self.process.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)

    def p_mean_variance_from_output(
        self,
        output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        denoised_fn: DenoisedFn = None,
    ) -> dict[str, torch.Tensor]:
        """``p_mean_variance`` for an already computed model ``output`` [N, C or 2C, H, W]; same
        returns and errors."""
        self.process.check_inputs(x_t, t)
        return self.process.p_mean_variance_from_output(output, x_t, t, clip_denoised, denoised_fn)

    def score(self, model: Model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's estimate of grad_x log q(x_t) = -E[eps | x_t] / sqrt(1 - alpha_bar_t)
        (Tweedie's formula; Song et al. 2021 "Score-based generative modeling", eq. 5 ff.); for
        ``prediction="score"`` the model's output itself.

        Args: model, x_t [N, C, H, W] float, t int64 [N] in [0, T).
        Returns: [N, C, H, W] with x_t's dtype (units: 1 / pixel-value).
        Raises: ValueError as ``p_mean_variance``.
        """
        self.process.check_inputs(x_t, t)
        return self.process.score_from_output(model(x_t, t), x_t, t)

    # ------------------------------------------------------------------ losses and the bound
    def training_losses(self, model: Model, x_start: torch.Tensor, t: torch.Tensor, noise=None, generator=None):
        """Per-image training losses ("loss", "mse", "vb": [N]); see :func:`diffusion_core.losses.training_losses`."""
        return losses.training_losses(self.process, model=model, x_start=x_start, t=t, noise=noise,
                                      generator=generator)

    def calc_bpd_loop(self, model: Model, x_start, clip_denoised: bool = False, generator=None,
                      progress: Progress = None):
        """The full variational bound in bits/dim, all T terms; see :func:`diffusion_core.bound.calc_bpd_loop`."""
        return bound.calc_bpd_loop(self.process, model=model, x_start=x_start, clip_denoised=clip_denoised,
                                   generator=generator, progress=progress)

    def calc_bpd_estimate(self, model: Model, x_start, num_samples: int = 16, clip_denoised: bool = False,
                          generator=None):
        """Stratified estimate of the bound in bits/dim; see :func:`diffusion_core.bound.calc_bpd_estimate`."""
        return bound.calc_bpd_estimate(self.process, model=model, x_start=x_start, num_samples=num_samples,
                                       clip_denoised=clip_denoised, generator=generator)

    # ------------------------------------------------------------------ samplers
    def p_sample(self, model: Model, x, t, clip_denoised: bool = True, denoised_fn: DenoisedFn = None,
                 generator=None, noise=None):
        """One ancestral step x_t -> x_{t-1}; see :func:`diffusion_core.samplers.ancestral.p_sample`."""
        return ancestral.p_sample(self.process, model=model, x=x, t=t, clip_denoised=clip_denoised,
                                  denoised_fn=denoised_fn, generator=generator, noise=noise)

    def p_sample_loop(self, model: Model, shape, generator=None, clip_denoised: bool = True,
                      progress: Progress = None, noise=None, device=None) -> torch.Tensor:
        """DDPM ancestral sampling; see :func:`diffusion_core.samplers.ancestral.p_sample_loop`."""
        return ancestral.p_sample_loop(self.process, model=model, shape=shape, generator=generator,
                                       clip_denoised=clip_denoised, progress=progress, noise=noise, device=device)

    def ddim_sample(self, model: Model, x, t, t_prev, eta: float = ETA.default, clip_denoised: bool = True,
                    denoised_fn: DenoisedFn = None, generator=None, noise=None):
        """One DDIM step x_t -> x_{t_prev}; see :func:`diffusion_core.samplers.ddim.ddim_sample`."""
        return ddim.ddim_sample(self.process, model=model, x=x, t=t, t_prev=t_prev, eta=eta,
                                clip_denoised=clip_denoised, denoised_fn=denoised_fn, generator=generator,
                                noise=noise)

    def ddim_sample_loop(self, model: Model, shape, num_steps: int = _DDIM.default_num_steps,
                         eta: float = ETA.default, generator=None, clip_denoised: bool = True,
                         progress: Progress = None, noise=None, device=None,
                         spacing: str = _DDIM.default_spacing) -> torch.Tensor:
        """DDIM sampling; see :func:`diffusion_core.samplers.ddim.ddim_sample_loop`."""
        return ddim.ddim_sample_loop(self.process, model=model, shape=shape, num_steps=num_steps, eta=eta,
                                     spacing=spacing, generator=generator, clip_denoised=clip_denoised,
                                     progress=progress, noise=noise, device=device)

    def pc_sample_loop(self, model: Model, shape, num_steps: Optional[int] = None,
                       corrector_steps: int = CORRECTOR_STEPS.default, snr: float = SNR.default, generator=None,
                       noise=None, clip_denoised: bool = True, progress: Progress = None,
                       spacing: str = SAMPLERS["pc"].default_spacing, device=None) -> torch.Tensor:
        """Predictor-corrector sampling (ancestral predictor, Langevin corrector; ``num_steps=None``: T);
        see :func:`diffusion_core.samplers.score_based.pc_sample_loop`."""
        return score_based.pc_sample_loop(self.process, model=model, shape=shape, num_steps=num_steps,
                                          corrector_steps=corrector_steps, snr=snr, spacing=spacing,
                                          generator=generator, noise=noise, clip_denoised=clip_denoised,
                                          progress=progress, device=device)

    def langevin_sample_loop(self, model: Model, shape, num_steps: Optional[int] = None,
                             corrector_steps: int = CORRECTOR_STEPS.default, snr: float = SNR.default,
                             generator=None, noise=None, clip_denoised: bool = True, progress: Progress = None,
                             spacing: str = SAMPLERS["langevin"].default_spacing, device=None) -> torch.Tensor:
        """Annealed Langevin dynamics over the noise levels (``num_steps=None``: T);
        see :func:`diffusion_core.samplers.score_based.langevin_sample_loop`."""
        return score_based.langevin_sample_loop(self.process, model=model, shape=shape, num_steps=num_steps,
                                                corrector_steps=corrector_steps, snr=snr, spacing=spacing,
                                                generator=generator, noise=noise, clip_denoised=clip_denoised,
                                                progress=progress, device=device)

    def dpm_solver_sample_loop(self, model: Model, shape, num_steps: int = _DPM_SOLVER.default_num_steps,
                               order: int = ORDER.default, spacing: str = _DPM_SOLVER.default_spacing,
                               generator=None, noise=None, clip_denoised: bool = True, progress: Progress = None,
                               device=None, algorithm: str = ALGORITHM.default) -> torch.Tensor:
        """DPM-Solver++ multistep sampling (the ODE, or ``algorithm="sde-dpmsolver++"``);
        see :func:`diffusion_core.samplers.dpm_solver.dpm_solver_sample_loop`."""
        return dpm_solver.dpm_solver_sample_loop(self.process, model=model, shape=shape, num_steps=num_steps,
                                                 order=order, spacing=spacing, algorithm=algorithm,
                                                 generator=generator, noise=noise, clip_denoised=clip_denoised,
                                                 progress=progress, device=device)

    def edm_heun_sample_loop(self, model: Model, shape, num_steps: int = _EDM_HEUN.default_num_steps,
                             generator=None, noise=None, clip_denoised: bool = True, progress: Progress = None,
                             device=None) -> torch.Tensor:
        """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1, rho = 7 levels of eq. 5; 2 S - 1
        model calls); see :func:`diffusion_core.samplers.edm.edm_heun_sample_loop`."""
        return edm.edm_heun_sample_loop(self.process, model=model, shape=shape, num_steps=num_steps,
                                        generator=generator, noise=noise, clip_denoised=clip_denoised,
                                        progress=progress, device=device)

    def network_evaluations(self, sampler: str, num_steps: Optional[int] = None, corrector_steps: int = 0) -> int:
        """Model calls of one ``*_sample_loop`` call (each on the whole batch);
        see :func:`diffusion_core.samplers.common.network_evaluations` (``num_steps=None``: T)."""
        return common.network_evaluations(
            sampler, num_steps=self.num_timesteps if num_steps is None else num_steps,
            corrector_steps=corrector_steps,
        )
