"""GaussianDiffusion: the forward process, its posterior, the reverse-process parameterization and
the training losses of DDPM (Ho et al. 2020) with the improvements of Nichol & Dhariwal 2021.

Conventions (docs/ARCHITECTURE.md):

* Timesteps are 0-based: index ``t`` in [0, T) is the paper's ``t + 1``; index 0 is the decoder
  step ``p(x_0 | x_1)``. ``t`` is an int64 tensor [N] (one timestep per image).
* Images are float tensors [N, C, H, W] with data pixels ``k / 127.5 - 1`` in [-1, 1].
* Every per-timestep coefficient is computed in float64 numpy and cast to the input's dtype
  (float32 in practice) only when it is gathered for a batch (``extract``).
* ``model`` is any callable ``model(x_t [N,C,H,W], t [N] int64) -> [N, C_out, H, W]`` with
  ``C_out = C``, or ``2C`` for ``variance="learned_range"``.

The samplers (``sampling.py``) and the variational bound (``bound.py``) are exposed as methods
here so that ``GaussianDiffusion`` is the one object callers need.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from diffusion_core import bound, losses, rng, sampling
from diffusion_core.config import DiffusionConfig
from diffusion_core.parameterization import ParameterizationMixin
from diffusion_core.schedule import get_named_beta_schedule
from diffusion_core.types import DenoisedFn, Model, Progress
from diffusion_core.validation import check_images, check_model_output, check_same_shape, check_timesteps


class GaussianDiffusion(ParameterizationMixin):
    """The DDPM math for one :class:`DiffusionConfig`, independent of the network.

    Attributes (all float64 numpy arrays [T], index 0 = the paper's t = 1):
        betas: beta_t of q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Ho et al. eq. 2).
        alphas: 1 - betas.
        alphas_cumprod: alpha_bar_t = prod_{s<=t} alpha_s (Ho et al. eq. 4).
        alphas_cumprod_prev: alpha_bar_{t-1}, with 1.0 at index 0.
        alphas_cumprod_next: alpha_bar_{t+1}, with 0.0 at index T-1.
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod,
        sqrt_recip_alphas_cumprod (1/sqrt(alpha_bar)), sqrt_recipm1_alphas_cumprod (sqrt(1/alpha_bar - 1)),
        one_minus_alphas_cumprod (1 - alpha_bar).
        posterior_variance: beta-tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
            (Ho et al. eq. 7); 0 at index 0.
        posterior_log_variance_clipped: log beta-tilde_t with index 0 replaced by index 1 before the
            log (the variance at index 0 is 0).
        posterior_mean_coef1, posterior_mean_coef2: mu-tilde_t = coef1 * x_0 + coef2 * x_t
            (Ho et al. eq. 7).
        fixed_large_variance, fixed_large_log_variance: beta_t with index 0 replaced by
            beta-tilde_1 (the "fixed_large" reverse variance, Ho et al. sec. 3.2), and its log.
        log_betas: log beta_t (the upper end of the learned_range interpolation).
        num_timesteps: T.
        config: the :class:`DiffusionConfig`.

    Raises:
        TypeError: if ``config`` is not a DiffusionConfig.
        ValueError: if the schedule is invalid for T (see ``schedule.py``).
    """

    def __init__(self, config: DiffusionConfig) -> None:
        if not isinstance(config, DiffusionConfig):
            raise TypeError(f"GaussianDiffusion expects a DiffusionConfig, got {type(config).__name__}")
        self.config = config
        self.num_timesteps = int(config.num_timesteps)
        betas = get_named_beta_schedule(config.schedule, self.num_timesteps)
        if not (np.all(betas > 0) and np.all(betas < 1)):
            raise ValueError(f"betas of schedule {config.schedule!r} must lie in (0, 1)")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )
        # fixed_large (Ho et al. sec. 3.2, sigma_t^2 = beta_t) with index 0 taken from beta-tilde_1,
        # so that the decoder's variance is not the (much larger) beta_1 -> log well defined.
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.log_betas = np.log(betas)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self._device_arrays: dict[tuple[int, str], tuple[np.ndarray, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_device_arrays"] = {}  # device copies are rebuilt on demand, never pickled
        return state

    def __repr__(self) -> str:
        return f"GaussianDiffusion({self.config!r})"

    # ------------------------------------------------------------------ helpers
    def extract(self, arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather ``arr[t]`` (float64 numpy [T]) into a tensor [N, 1, 1, 1] (one trailing 1 per
        dimension of ``like`` after the first) with ``like``'s dtype and device. The values are
        cast from float64 only after gathering, so no precision is lost before the cast.

        The float64 copy of a schedule array (an attribute of this object) on ``t``'s device is made
        once per device and kept, so that sampling loops do not copy it host-to-device (a stream
        synchronization on accelerators) at every step."""
        values = self._on_device(arr, t.device)[t]
        return values.to(dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))

    def _on_device(self, arr: np.ndarray, device: torch.device) -> torch.Tensor:
        key = (id(arr), str(device))
        cached = self._device_arrays.get(key)
        if cached is not None and cached[0] is arr:
            return cached[1]
        tensor = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
        if any(arr is value for value in self.__dict__.values()):  # schedule arrays only, not temporaries
            self._device_arrays[key] = (arr, tensor)
        return tensor

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, name: str = "x_t") -> None:
        """Require images ``x`` float [N, C, H, W] and 0-based timesteps ``t`` int64 [N] in [0, T).

        Every public single-call method validates its (x, t) with this once; sampling loops call it
        (through the public functions) only at their entry, since reading ``t.min()``/``t.max()``
        waits for the device.

        Raises:
            TypeError: if ``x`` or ``t`` is not a tensor.
            ValueError: on a bad shape/dtype of ``x`` (named ``name``) or ``t``, or t outside [0, T).
        """
        check_images(x, name)
        check_timesteps(t, x.shape[0], self.num_timesteps)

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
        self.check_inputs(x_start, t, "x_start")
        mean = self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self.extract(self.one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
        log_variance = self.extract(self.log_one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
        return mean, variance, log_variance

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
        self.check_inputs(x_start, t, "x_start")
        if noise is None:
            noise = rng.randn(x_start.shape, generator, device=x_start.device, dtype=x_start.dtype)
        check_same_shape(noise, x_start, "noise", "x_start")
        return self._q_sample(x_start, t, noise)

    def _q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``q_sample`` with given ``noise`` and without the input checks."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

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
        self.check_inputs(x_t, t)
        check_same_shape(x_start, x_t, "x_start", "x_t")
        return self._q_posterior_mean_variance(x_start, x_t, t)

    def _q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """``q_posterior_mean_variance`` without the input checks (for callers that made them)."""
        mean = (
            self.extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self.extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self,
        model: Model,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        denoised_fn: DenoisedFn = None,
    ) -> dict[str, torch.Tensor]:
        """Run the model and form p(x_{t-1} | x_t) = N(mean, variance) (Ho et al. 2020, eqs. 1, 11).

        The mean is the posterior mean mu-tilde(x_t, pred_xstart) of eq. 7 evaluated at the model's
        x_0 prediction (eq. 11 for eps-prediction; Salimans & Ho 2022 for v). The variance is
        ``config.variance``: "fixed_small" = beta-tilde_t (log clipped at index 0), "fixed_large" =
        beta_t (index 0: beta-tilde_1), "learned_range" = exp(frac log beta_t + (1 - frac)
        log beta-tilde_t) with ``frac = (v + 1) / 2`` from the model's last C channels
        (Nichol & Dhariwal 2021, eq. 15).

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
        self.check_inputs(x_t, t)
        return self._p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)

    def _p_mean_variance(
        self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
        denoised_fn: DenoisedFn = None,
    ) -> dict[str, torch.Tensor]:
        """``p_mean_variance`` without the (x_t, t) checks; the model output's shape is still checked."""
        return self._p_mean_variance_from_output(model(x_t, t), x_t, t, clip_denoised, denoised_fn)

    def p_mean_variance_from_output(
        self,
        output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        denoised_fn: DenoisedFn = None,
    ) -> dict[str, torch.Tensor]:
        """``p_mean_variance`` for an already computed model ``output`` [N, C or 2C, H, W]; same
        returns and errors. Used by the losses, which need the raw output too."""
        self.check_inputs(x_t, t)
        return self._p_mean_variance_from_output(output, x_t, t, clip_denoised, denoised_fn)

    def _p_mean_variance_from_output(
        self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
        denoised_fn: DenoisedFn = None,
    ) -> dict[str, torch.Tensor]:
        """``p_mean_variance_from_output`` without the (x_t, t) checks (the output shape is checked)."""
        check_model_output(output, x_t, self.config.learn_sigma)
        channels = x_t.shape[1]
        model_output = output[:, :channels]
        if self.config.variance == "learned_range":
            frac = (output[:, channels:] + 1.0) / 2.0
            min_log = self.extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = self.extract(self.log_betas, t, x_t)
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.config.variance == "fixed_small":
            variance = self.extract(self.posterior_variance, t, x_t).expand_as(x_t)
            log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        else:
            variance = self.extract(self.fixed_large_variance, t, x_t).expand_as(x_t)
            log_variance = self.extract(self.fixed_large_log_variance, t, x_t).expand_as(x_t)

        pred_xstart, pred_eps = self._denoise_from_output(model_output, x_t, t, clip_denoised, denoised_fn)
        mean, _, _ = self._q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "pred_eps": pred_eps,
            "model_output": model_output,
        }

    def _denoise_from_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
        denoised_fn: DenoisedFn = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred_xstart, pred_eps) [N, C, H, W] from the network's first C channels ``model_output``:
        ``denoised_fn`` and then the clamp to [-1, 1] (``clip_denoised``) are applied to pred_xstart,
        and pred_eps is then recomputed from it (Ho et al. eq. 4 solved for eps). Unchecked."""
        pred_xstart, pred_eps = self.xstart_and_eps_from_output(model_output, x_t, t)
        if denoised_fn is not None or clip_denoised:
            if denoised_fn is not None:
                pred_xstart = denoised_fn(pred_xstart)
            if clip_denoised:
                pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            pred_eps = self.predict_eps_from_xstart(x_t, t, pred_xstart)
        return pred_xstart, pred_eps

    def _score_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score [N, C, H, W] from a model ``output`` [N, C or 2C, H, W] (shape checked, (x_t, t) not):
        the first C channels themselves for ``prediction="score"``, else -pred_eps / sqrt(1 - alpha_bar_t)."""
        check_model_output(output, x_t, self.config.learn_sigma)
        model_output = output[:, : x_t.shape[1]]
        if self.config.prediction == "score":
            return model_output
        _, pred_eps = self.xstart_and_eps_from_output(model_output, x_t, t)
        return self.predict_score_from_eps(x_t, t, pred_eps)

    def score(self, model: Model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's estimate of grad_x log q(x_t) = -E[eps | x_t] / sqrt(1 - alpha_bar_t)
        (Tweedie's formula; Song et al. 2021 "Score-based generative modeling", eq. 5 ff.); for
        ``prediction="score"`` the model's output itself.

        Args: model, x_t [N, C, H, W] float, t int64 [N] in [0, T).
        Returns: [N, C, H, W] with x_t's dtype (units: 1 / pixel-value).
        Raises: ValueError as ``p_mean_variance``.
        """
        self.check_inputs(x_t, t)
        return self._score_from_output(model(x_t, t), x_t, t)

    # ------------------------------------------------------------------ delegated API
    def training_losses(self, model: Model, x_start: torch.Tensor, t: torch.Tensor, noise=None, generator=None):
        """Per-image training losses ("loss", "mse", "vb": [N]); see :func:`diffusion_core.losses.training_losses`."""
        return losses.training_losses(self, model=model, x_start=x_start, t=t, noise=noise, generator=generator)

    def _vb_terms_bpd(self, model: Model, x_start, x_t, t, clip_denoised: bool = False):
        """The bound term L_t in bits/dim at (x_t, t); see :func:`diffusion_core.bound.vb_terms_bpd`."""
        return bound.vb_terms_bpd(self, output=model(x_t, t), x_start=x_start, x_t=x_t, t=t,
                                  clip_denoised=clip_denoised)

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, [N]; see :func:`diffusion_core.bound.prior_bpd`."""
        return bound.prior_bpd(self, x_start=x_start)

    def calc_bpd_loop(self, model: Model, x_start, clip_denoised: bool = False, generator=None,
                      progress: Progress = None):
        """The full variational bound in bits/dim, all T terms; see :func:`diffusion_core.bound.calc_bpd_loop`."""
        return bound.calc_bpd_loop(self, model=model, x_start=x_start, clip_denoised=clip_denoised,
                                   generator=generator, progress=progress)

    def calc_bpd_estimate(self, model: Model, x_start, num_samples: int = 16, clip_denoised: bool = False,
                          generator=None):
        """Stratified estimate of the bound in bits/dim; see :func:`diffusion_core.bound.calc_bpd_estimate`."""
        return bound.calc_bpd_estimate(self, model=model, x_start=x_start, num_samples=num_samples,
                                       clip_denoised=clip_denoised, generator=generator)

    def p_sample(self, model: Model, x, t, clip_denoised: bool = True, denoised_fn: DenoisedFn = None,
                 generator=None, noise=None):
        """One ancestral step x_t -> x_{t-1}; see :func:`diffusion_core.sampling.p_sample`."""
        return sampling.p_sample(self, model=model, x=x, t=t, clip_denoised=clip_denoised,
                                 denoised_fn=denoised_fn, generator=generator, noise=noise)

    def p_sample_loop(self, model: Model, shape, generator=None, clip_denoised: bool = True,
                      progress: Progress = None, noise=None, device=None) -> torch.Tensor:
        """DDPM ancestral sampling; see :func:`diffusion_core.sampling.p_sample_loop`."""
        return sampling.p_sample_loop(self, model=model, shape=shape, generator=generator,
                                      clip_denoised=clip_denoised, progress=progress, noise=noise, device=device)

    def ddim_sample(self, model: Model, x, t, t_prev, eta: float = 0.0, clip_denoised: bool = True,
                    denoised_fn: DenoisedFn = None, generator=None, noise=None):
        """One DDIM step x_t -> x_{t_prev}; see :func:`diffusion_core.sampling.ddim_sample`."""
        return sampling.ddim_sample(self, model=model, x=x, t=t, t_prev=t_prev, eta=eta, clip_denoised=clip_denoised,
                                    denoised_fn=denoised_fn, generator=generator, noise=noise)

    def ddim_sample_loop(self, model: Model, shape, num_steps: int = 50, eta: float = 0.0, generator=None,
                         clip_denoised: bool = True, progress: Progress = None, noise=None, device=None,
                         spacing: str = "uniform") -> torch.Tensor:
        """DDIM sampling; see :func:`diffusion_core.sampling.ddim_sample_loop`."""
        return sampling.ddim_sample_loop(self, model=model, shape=shape, num_steps=num_steps, eta=eta,
                                         generator=generator, clip_denoised=clip_denoised, progress=progress,
                                         noise=noise, device=device, spacing=spacing)

    def pc_sample_loop(self, model: Model, shape, num_steps: Optional[int] = None, corrector_steps: int = 1,
                       snr: float = 0.16, generator=None, noise=None, clip_denoised: bool = True,
                       progress: Progress = None, spacing: str = "uniform", device=None) -> torch.Tensor:
        """Predictor-corrector sampling (ancestral predictor, Langevin corrector);
        see :func:`diffusion_core.sampling.pc_sample_loop`."""
        return sampling.pc_sample_loop(self, model=model, shape=shape, num_steps=num_steps,
                                       corrector_steps=corrector_steps, snr=snr, generator=generator, noise=noise,
                                       clip_denoised=clip_denoised, progress=progress, spacing=spacing,
                                       device=device)

    def langevin_sample_loop(self, model: Model, shape, num_steps: Optional[int] = None, corrector_steps: int = 1,
                             snr: float = 0.16, generator=None, noise=None, clip_denoised: bool = True,
                             progress: Progress = None, spacing: str = "uniform", device=None) -> torch.Tensor:
        """Annealed Langevin dynamics over the noise levels;
        see :func:`diffusion_core.sampling.langevin_sample_loop`."""
        return sampling.langevin_sample_loop(self, model=model, shape=shape, num_steps=num_steps,
                                             corrector_steps=corrector_steps, snr=snr, generator=generator,
                                             noise=noise, clip_denoised=clip_denoised, progress=progress,
                                             spacing=spacing, device=device)

    def dpm_solver_sample_loop(self, model: Model, shape, num_steps: int = 20, order: int = 2,
                               spacing: str = "logsnr", generator=None, noise=None, clip_denoised: bool = True,
                               progress: Progress = None, device=None,
                               algorithm: str = "dpmsolver++") -> torch.Tensor:
        """DPM-Solver++ multistep sampling (the ODE, or ``algorithm="sde-dpmsolver++"``);
        see :func:`diffusion_core.sampling.dpm_solver_sample_loop`."""
        return sampling.dpm_solver_sample_loop(self, model=model, shape=shape, num_steps=num_steps, order=order,
                                               spacing=spacing, generator=generator, noise=noise,
                                               clip_denoised=clip_denoised, progress=progress, device=device,
                                               algorithm=algorithm)

    def network_evaluations(self, sampler: str, num_steps: Optional[int] = None, corrector_steps: int = 0) -> int:
        """Model calls of one ``*_sample_loop`` call (each on the whole batch);
        see :func:`diffusion_core.sampling.network_evaluations` (``num_steps=None``: T)."""
        return sampling.network_evaluations(
            sampler, num_steps=self.num_timesteps if num_steps is None else num_steps,
            corrector_steps=corrector_steps,
        )
