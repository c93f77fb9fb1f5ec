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

from typing import Callable, Optional

import numpy as np
import torch

from diffusion_core import bound, losses, rng, sampling
from diffusion_core.config import DiffusionConfig
from diffusion_core.parameterization import ParameterizationMixin
from diffusion_core.schedule import get_named_beta_schedule
from diffusion_core.validation import check_images, check_model_output, check_same_shape, check_timesteps

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DenoisedFn = Optional[Callable[[torch.Tensor], torch.Tensor]]


class GaussianDiffusion(ParameterizationMixin):
    """The DDPM math for one :class:`DiffusionConfig`, independent of the network.

    Attributes (all float64 numpy arrays [T], index 0 = the paper's t = 1):
        betas: beta_t of q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Ho et al. eq. 2).
        alphas: 1 - betas.
        alphas_cumprod: alpha_bar_t = prod_{s<=t} alpha_s (Ho et al. eq. 4).
        alphas_cumprod_prev: alpha_bar_{t-1}, with 1.0 at index 0.
        alphas_cumprod_next: alpha_bar_{t+1}, with 0.0 at index T-1.
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod,
        sqrt_recip_alphas_cumprod (1/sqrt(alpha_bar)), sqrt_recipm1_alphas_cumprod (sqrt(1/alpha_bar - 1)).
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

    def __repr__(self) -> str:
        return f"GaussianDiffusion({self.config!r})"

    # ------------------------------------------------------------------ helpers
    def extract(self, arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather ``arr[t]`` (float64 numpy [T]) into a tensor [N, 1, 1, 1] (one trailing 1 per
        dimension of ``like`` after the first) with ``like``'s dtype and device. The values are
        cast from float64 only after gathering, so no precision is lost before the cast."""
        values = torch.from_numpy(np.ascontiguousarray(arr)).to(t.device)[t]
        return values.to(dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))

    def _check(self, x: torch.Tensor, t: torch.Tensor, name: str = "x_t") -> None:
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
        self._check(x_start, t, "x_start")
        mean = self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self.extract(1.0 - self.alphas_cumprod, t, x_start).expand_as(x_start)
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
        self._check(x_start, t, "x_start")
        if noise is None:
            noise = rng.randn(x_start.shape, generator, device=x_start.device, dtype=x_start.dtype)
        check_same_shape(noise, x_start, "noise", "x_start")
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
        self._check(x_t, t)
        check_same_shape(x_start, x_t, "x_start", "x_t")
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
        self._check(x_t, t)
        output = model(x_t, t)
        return self.p_mean_variance_from_output(output, x_t, t, clip_denoised, denoised_fn)

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
        self._check(x_t, t)
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

        pred_xstart, pred_eps = self.xstart_and_eps_from_output(model_output, x_t, t)
        if denoised_fn is not None or clip_denoised:
            if denoised_fn is not None:
                pred_xstart = denoised_fn(pred_xstart)
            if clip_denoised:
                pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            pred_eps = self.predict_eps_from_xstart(x_t, t, pred_xstart)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "pred_eps": pred_eps,
            "model_output": model_output,
        }

    def score(self, model: Model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's estimate of grad_x log q(x_t) = -E[eps | x_t] / sqrt(1 - alpha_bar_t)
        (Tweedie's formula; Song et al. 2021 "Score-based generative modeling", eq. 5 ff.).

        Args: model, x_t [N, C, H, W] float, t int64 [N] in [0, T).
        Returns: [N, C, H, W] with x_t's dtype (units: 1 / pixel-value).
        Raises: ValueError as ``p_mean_variance``.
        """
        pred_eps = self.p_mean_variance(model, x_t, t)["pred_eps"]
        return -pred_eps / self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    # ------------------------------------------------------------------ delegated API
    def training_losses(self, model: Model, x_start: torch.Tensor, t: torch.Tensor, noise=None, generator=None):
        """Per-image losses for ``config.loss`` with one model call at x_t = q_sample(x_start, t, noise).

        x_start float [N, C, H, W] in [-1, 1], t int64 [N] in [0, T), noise optional [N, C, H, W].
        Returns a dict of [N] tensors: "loss" (simple: MSE on the eps/x_0/v target, Ho et al. eq. 14;
        vlb: T * vb; hybrid: MSE + vlb_weight * T * vb with the mean stopped, Nichol & Dhariwal
        sec. 3.1), "mse", "vb" (the single term L_t in bits/dim; zeros for "simple").
        Raises ValueError on bad shapes, t out of range or a wrong model output shape.
        Full documentation: :func:`diffusion_core.losses.training_losses`.
        """
        return losses.training_losses(self, model, x_start, t, noise=noise, generator=generator)

    def _vb_terms_bpd(self, model: Model, x_start, x_t, t, clip_denoised: bool = False):
        """The bound term L_t in bits/dim for x_start, x_t [N, C, H, W] and t int64 [N]: the posterior
        KL (Ho et al. eq. 5) for t > 0, the decoder NLL (eq. 13) at t = 0. Returns a dict "output" [N],
        "pred_xstart", "pred_eps" [N, C, H, W]; see :func:`diffusion_core.bound.vb_terms_bpd`."""
        return bound.vb_terms_bpd(self, model(x_t, t), x_start, x_t, t, clip_denoised)

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, [N], for x_start [N, C, H, W];
        see :func:`diffusion_core.bound.prior_bpd`."""
        return bound.prior_bpd(self, x_start)

    def calc_bpd_loop(self, model: Model, x_start, clip_denoised: bool = False, generator=None, progress=None):
        """The full variational bound in bits/dim with all T terms (T model calls on the whole batch).

        x_start float32 [N, C, H, W] on the 256-level grid. Returns "total_bpd" [N], "prior_bpd" [N],
        "vb" [N, T] (column 0: decoder term L_0), "xstart_mse" [N, T], "mse" [N, T].
        Full documentation: :func:`diffusion_core.bound.calc_bpd_loop`.
        """
        return bound.calc_bpd_loop(self, model, x_start, clip_denoised, generator, progress)

    def calc_bpd_estimate(self, model: Model, x_start, num_samples: int = 16, clip_denoised: bool = False,
                          generator=None):
        """Unbiased stratified estimate of the full bound in bits/dim from K = num_samples model calls.

        x_start float32 [N, C, H, W]. Returns "total_bpd" [N], "stderr" [N] (bits/dim), "prior_bpd" [N],
        "num_samples" (int). Raises ValueError unless 2 <= K <= 2T.
        Full documentation: :func:`diffusion_core.bound.calc_bpd_estimate`.
        """
        return bound.calc_bpd_estimate(self, model, x_start, num_samples, clip_denoised, generator)

    def p_sample(self, model: Model, x, t, clip_denoised: bool = True, denoised_fn: DenoisedFn = None,
                 generator=None, noise=None):
        """One ancestral step x_t -> x_{t-1} (Ho et al. Algorithm 2) for x [N, C, H, W], t int64 [N];
        no noise where t == 0. Returns "sample" and "pred_xstart" [N, C, H, W].
        Full documentation: :func:`diffusion_core.sampling.p_sample`."""
        return sampling.p_sample(self, model, x, t, clip_denoised, denoised_fn, generator, noise)

    def p_sample_loop(self, model: Model, shape, generator=None, clip_denoised: bool = True, progress=None,
                      noise=None, device=None) -> torch.Tensor:
        """Ancestral DDPM sampling (Ho et al. Algorithm 2), T model calls; returns float32 ``shape``
        = [N, C, H, W] images (in [-1, 1] when clipped). ``progress(step_index, total_steps)`` is
        called after each step (0-based). Full documentation: :func:`diffusion_core.sampling.p_sample_loop`."""
        return sampling.p_sample_loop(self, model, shape, generator, clip_denoised, progress, noise, device)

    def ddim_sample(self, model: Model, x, t, t_prev, eta: float = 0.0, clip_denoised: bool = True,
                    denoised_fn: DenoisedFn = None, generator=None, noise=None):
        """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12) for x [N, C, H, W], t and t_prev
        int64 [N] (t_prev = -1: to x_0). Returns "sample" and "pred_xstart" [N, C, H, W].
        Full documentation: :func:`diffusion_core.sampling.ddim_sample`."""
        return sampling.ddim_sample(self, model, x, t, t_prev, eta, clip_denoised, denoised_fn, generator, noise)

    def ddim_sample_loop(self, model: Model, shape, num_steps: int = 50, eta: float = 0.0, generator=None,
                         clip_denoised: bool = True, progress=None, noise=None, device=None) -> torch.Tensor:
        """DDIM sampling (Song et al. 2021, eq. 12) over ``num_steps`` (1..T) evenly spaced timesteps
        from T-1 to 0; returns float32 ``shape`` = [N, C, H, W] images. Raises ValueError on a bad
        num_steps or eta < 0. Full documentation: :func:`diffusion_core.sampling.ddim_sample_loop`."""
        return sampling.ddim_sample_loop(
            self, model, shape, num_steps, eta, generator, clip_denoised, progress, noise, device
        )
