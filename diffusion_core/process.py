"""The Gaussian diffusion process of DDPM (Ho et al. 2020) with the improvements of Nichol &
Dhariwal 2021: its coefficients, the forward process q, its posterior, the reverse process p from
a model output, and the parameterization conversions (``parameterization.py``) and score.

This is the bottom layer of the diffusion math: ``bound``, ``losses`` and the samplers
(``diffusion_core/samplers/``) are written on the public names of :class:`DiffusionProcess`, and
``GaussianDiffusion`` (``diffusion.py``) is the facade over all of them.

Contract: the methods here are the math and do not validate their (x, t) inputs, because checking
a timestep tensor reads ``t.min()``/``t.max()`` and so waits for the device; every public entry
point above (the ``GaussianDiffusion`` methods, the loops' and the bound's entry functions) checks
its inputs once with :meth:`DiffusionProcess.check_inputs` and then calls these. Model outputs are
always checked (their shape is known only when the model has run).

Conventions (docs/ARCHITECTURE.md):

* Timesteps are 0-based: index ``t`` in [0, T) is the paper's ``t + 1``; index 0 is the decoder
  step ``p(x_0 | x_1)``. ``t`` is an int64 tensor [N] (one timestep per image).
* Images are float tensors [N, C, H, W] with data pixels ``k / 127.5 - 1`` in [-1, 1].
* Every per-timestep coefficient is computed in float64 numpy and cast to the input's dtype
  (float32 in practice) only when it is gathered for a batch (:meth:`DiffusionProcess.extract`).
* A model output is [N, C_out, H, W] with ``C_out = C``, or ``2C`` for ``variance="learned_range"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffusion_core.config import DiffusionConfig
from diffusion_core.parameterization import ParameterizationMixin
from diffusion_core.schedule import get_named_beta_schedule
from diffusion_core.timesteps import edm_lognormal_probabilities
from diffusion_core.types import DenoisedFn, Model
from diffusion_core.validation import check_images, check_model_output, check_timesteps


class DiffusionProcess(ParameterizationMixin):
    """The DDPM process for one :class:`DiffusionConfig`, independent of the network.

    Attributes (all float64 numpy arrays [T], index 0 = the paper's t = 1):
        betas: beta_t of q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Ho et al. eq. 2).
        alphas: 1 - betas.
        alphas_cumprod: alpha_bar_t = prod_{s<=t} alpha_s (Ho et al. eq. 4).
        alphas_cumprod_prev: alpha_bar_{t-1}, with 1.0 at index 0.
        alphas_cumprod_next: alpha_bar_{t+1}, with 0.0 at index T-1.
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod,
        sqrt_recip_alphas_cumprod (1/sqrt(alpha_bar)), sqrt_recipm1_alphas_cumprod (sqrt(1/alpha_bar - 1)),
        one_minus_alphas_cumprod (1 - alpha_bar).
        snr: the signal-to-noise ratio of q(x_t | x_0), SNR_t = alpha_bar_t / (1 - alpha_bar_t)
            (Kingma et al. 2021, "Variational Diffusion Models"); read by the loss weights
            (``diffusion_core.losses.loss_weight``).
        timestep_probabilities: the distribution training draws timesteps from: ``None`` for
            ``config.timestep_distribution`` "uniform", else p_t, float64 [T] summing to 1
            (``diffusion_core.timesteps.edm_lognormal_probabilities``), computed once here.
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
            raise TypeError(f"DiffusionProcess expects a DiffusionConfig, got {type(config).__name__}")
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
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.timestep_probabilities: np.ndarray | None = None
        if config.timestep_distribution == "edm_lognormal":
            self.timestep_probabilities = edm_lognormal_probabilities(
                self.alphas_cumprod, config.edm_p_mean, config.edm_p_std)
        self._device_arrays: dict[tuple[int, str], tuple[np.ndarray, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_device_arrays"] = {}  # device copies are rebuilt on demand, never pickled
        return state

    def __repr__(self) -> str:
        return f"DiffusionProcess({self.config!r})"

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

        Every public entry point validates its (x, t) with this once; sampling loops call it
        (through their public functions) only at their entry, since reading ``t.min()``/``t.max()``
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
        (Ho et al. 2020, eq. 4), each [N, C, H, W] with x_start's dtype, for x_start [N, C, H, W]
        and t int64 [N] in [0, T) (unchecked)."""
        mean = self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self.extract(self.one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
        log_variance = self.extract(self.log_one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = ``sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise`` (Ho et al. eq. 4), [N, C, H, W]
        with x_start's dtype, for x_start and noise [N, C, H, W] and t int64 [N] in [0, T) (unchecked)."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of the forward-process posterior
        q(x_{t-1} | x_t, x_0) = N(mu-tilde_t, beta-tilde_t I) (Ho et al. 2020, eqs. 6-7), each
        [N, C, H, W], for x_start and x_t [N, C, H, W] and t int64 [N] in [0, T) (unchecked). At
        t = 0 the mean is x_0 and the variance 0 (the log-variance is the clipped value log
        beta-tilde at index 1)."""
        mean = (
            self.extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self.extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
        denoised_fn: DenoisedFn = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`p_mean_variance_from_output` of ``model(x_t, t)``: one model call, (x_t, t) unchecked."""
        return self.p_mean_variance_from_output(model(x_t, t), x_t, t, clip_denoised, denoised_fn)

    def p_mean_variance_from_output(
        self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
        denoised_fn: DenoisedFn = None,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) = N(mean, variance) from a model ``output`` [N, C or 2C, H, W] at
        (x_t [N, C, H, W], t int64 [N]) (Ho et al. 2020, eqs. 1, 11); (x_t, t) unchecked.

        The mean is the posterior mean mu-tilde(x_t, pred_xstart) of eq. 7 evaluated at the model's
        x_0 prediction (eq. 11 for eps-prediction; Salimans & Ho 2022 for v). The variance is
        ``config.variance``: "fixed_small" = beta-tilde_t (log clipped at index 0), "fixed_large" =
        beta_t (index 0: beta-tilde_1), "learned_range" = exp(frac log beta_t + (1 - frac)
        log beta-tilde_t) with ``frac = (v + 1) / 2`` from the model's last C channels
        (Nichol & Dhariwal 2021, eq. 15). ``clip_denoised`` and ``denoised_fn`` act on pred_xstart
        as in :meth:`denoise_from_output`.

        Returns:
            dict with "mean", "variance", "log_variance", "pred_xstart", "pred_eps" (each
            [N, C, H, W]) and "model_output" (the raw first C channels).

        Raises:
            ValueError: on a model output with the wrong shape (2C channels for learned_range, C otherwise).
        """
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

        pred_xstart, pred_eps = self.denoise_from_output(model_output, x_t, t, clip_denoised, denoised_fn)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "pred_eps": pred_eps,
            "model_output": model_output,
        }

    def denoise_from_output(
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

    def score_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's estimate [N, C, H, W] of grad_x log q(x_t) from its ``output`` [N, C or 2C, H, W]:
        the first C channels themselves for ``prediction="score"``, else -pred_eps / sqrt(1 - alpha_bar_t)
        (Tweedie's formula; Song et al. 2021, "Score-based generative modeling", eq. 5 ff.).
        Units: 1 / pixel-value. (x_t, t) unchecked; raises ValueError on a wrong output shape."""
        check_model_output(output, x_t, self.config.learn_sigma)
        model_output = output[:, : x_t.shape[1]]
        if self.config.prediction == "score":
            return model_output
        _, pred_eps = self.xstart_and_eps_from_output(model_output, x_t, t)
        return self.predict_score_from_eps(x_t, t, pred_eps)
