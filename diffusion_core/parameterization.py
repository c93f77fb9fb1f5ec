"""Conversions between the four things a network can predict: the noise eps, the clean image x_0,
the velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4), and
the score grad_x log q(x_t) = -eps / sqrt(1 - alpha_bar_t) (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", with E[eps | x_t] by Tweedie's formula).

They all follow from x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4).
A mixin for :class:`diffusion_core.process.DiffusionProcess`, which supplies the float64
schedule arrays and ``extract``. Every tensor is [N, C, H, W]; ``t`` is int64 [N], 0-based.
"""

from __future__ import annotations

import torch


class ParameterizationMixin:
    """eps / x_start / v / score conversions (all tensors [N, C, H, W], t int64 [N] in [0, T))."""

    def predict_score_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """score = -eps / sqrt(1 - alpha_bar) (Tweedie's formula: grad log q(x_t) = -E[eps | x_t] / sigma_t)."""
        return -eps / self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    def predict_eps_from_score(self, x_t: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """eps = -sqrt(1 - alpha_bar) score (the inverse of :meth:`predict_score_from_eps`)."""
        return -self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * score

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (Ho et al. eq. 4 solved for x_0; eq. 15)."""
        return (
            self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(alpha_bar) - x_0) / sqrt(1 / alpha_bar - 1) (Ho et al. eq. 4 solved for eps)."""
        return (
            self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v (Salimans & Ho 2022, sec. 4)."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def predict_eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t (Salimans & Ho 2022, sec. 4)."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_t) * v
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        )

    def predict_v(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, the v-prediction target (Salimans & Ho 2022)."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_start) * noise
            - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
        )

    def predict_v_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v for a given (x_t, eps): ``predict_v(predict_xstart_from_eps(x_t, t, eps), t, eps)``."""
        return self.predict_v(self.predict_xstart_from_eps(x_t, t, eps), t, eps)

    def predict_v_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """v for a given (x_t, x_0): ``predict_v(x_0, t, predict_eps_from_xstart(x_t, t, x_0))``."""
        return self.predict_v(pred_xstart, t, self.predict_eps_from_xstart(x_t, t, pred_xstart))

    def xstart_and_eps_from_output(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(pred_xstart, pred_eps) from the network's first C channels under ``config.prediction``
        ("eps", "x_start", "v" or "score")."""
        prediction = self.config.prediction
        if prediction == "eps":
            return self.predict_xstart_from_eps(x_t, t, model_output), model_output
        if prediction == "x_start":
            return model_output, self.predict_eps_from_xstart(x_t, t, model_output)
        if prediction == "score":
            eps = self.predict_eps_from_score(x_t, t, model_output)
            return self.predict_xstart_from_eps(x_t, t, eps), eps
        return self.predict_xstart_from_v(x_t, t, model_output), self.predict_eps_from_v(x_t, t, model_output)

    def output_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What a network of ``config.prediction`` outputs when its noise estimate is ``eps``:
        eps itself, x_0, v, or the score (the inverse of :meth:`xstart_and_eps_from_output`)."""
        prediction = self.config.prediction
        if prediction == "eps":
            return eps
        if prediction == "x_start":
            return self.predict_xstart_from_eps(x_t, t, eps)
        if prediction == "score":
            return self.predict_score_from_eps(x_t, t, eps)
        return self.predict_v_from_eps(x_t, t, eps)

    def training_target(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output for ``config.prediction``: eps, x_0, v, or the score of
        q(x_t | x_0), -eps / sqrt(1 - alpha_bar) (the denoising score matching target, Vincent 2011)."""
        prediction = self.config.prediction
        if prediction == "eps":
            return noise
        if prediction == "x_start":
            return x_start
        if prediction == "score":
            return -noise / self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start)
        return self.predict_v(x_start, t, noise)
