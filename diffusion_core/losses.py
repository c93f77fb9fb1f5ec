"""Training losses of DDPM: "simple" (Ho et al. 2020, eq. 14), "vlb" (the true bound terms) and
"hybrid" (Nichol & Dhariwal 2021, eq. 16 with the stop-gradient of sec. 3.1), optionally with a
per-timestep weighting of the MSE (:func:`loss_weight`): Min-SNR-gamma (Hang et al. 2023,
:func:`min_snr_weight`) or EDM's lambda(sigma) (Karras et al. 2022, :func:`edm_weight`).

Called through :meth:`GaussianDiffusion.training_losses`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from diffusion_core import rng
from diffusion_core.bound import mean_flat, vb_terms_bpd
from diffusion_core.config import DiffusionConfig, LossWeighting, Prediction
from diffusion_core.process import DiffusionProcess
from diffusion_core.types import Model
from diffusion_core.validation import check_choice, check_model_output, check_number_in, check_same_shape


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """The Min-SNR-gamma weight of each example's MSE (Hang et al. 2023, "Efficient Diffusion
    Training via Min-SNR Weighting Strategy", sec. 3.4): the loss weight min(SNR_t, gamma) of the
    x_0-MSE, expressed on the MSE that :func:`training_losses` computes for ``prediction``.

    With alpha_t = sqrt(alphas_cumprod_t), sigma_t = sqrt(1 - alphas_cumprod_t) and
    SNR_t = alpha_t^2 / sigma_t^2 (``DiffusionProcess.snr``; 0-based timesteps, index t is the
    paper's t + 1), a network output fixes (x_0-hat, eps-hat) with x_t = alpha_t x_0-hat +
    sigma_t eps-hat, and the true (x_0, eps) satisfy the same equation, so the errors obey
    alpha_t dx_0 + sigma_t deps = 0. Hence, per example:

    * x_0-MSE = |dx_0|^2 = |deps|^2 / SNR_t;
    * v = alpha_t eps - sigma_t x_0, so dv = alpha_t deps - sigma_t dx_0 = deps / alpha_t (as
      alpha_t^2 + sigma_t^2 = 1), and |dv|^2 = |deps|^2 (SNR_t + 1) / SNR_t = (SNR_t + 1) |dx_0|^2;
    * "score": this project trains the score by denoising score matching weighted by
      lambda_t = 1 - alphas_cumprod_t, (1 - abar_t) |s_theta + eps / sigma_t|^2
      = |sigma_t s_theta + eps|^2, which is the eps-MSE of eps_theta = -sigma_t s_theta
      (see :func:`training_losses`), i.e. SNR_t |dx_0|^2.

    The weight that turns each into min(SNR_t, gamma) |dx_0|^2 is therefore

    * "x_start": min(SNR_t, gamma);
    * "eps": min(SNR_t, gamma) / SNR_t;
    * "v": min(SNR_t, gamma) / (SNR_t + 1);
    * "score": min(SNR_t, gamma) / SNR_t, the eps weight, on the lambda_t-weighted score MSE
      (on the unweighted |s_theta - score|^2 it would be (1 - abar_t) min(SNR_t, gamma) / SNR_t).

    Args:
        snr: SNR_t of each example's timestep, float [N] (> 0).
        gamma: the clamp gamma, a finite number > 0 (5 in the paper).
        prediction: "eps", "x_start", "v" or "score".

    Returns:
        float [N], ``snr``'s dtype and device.

    Raises:
        ValueError: on an unknown ``prediction`` or a ``gamma`` that is not a finite number > 0.
    """
    check_choice("prediction", prediction, Prediction)
    check_number_in("min_snr_gamma", gamma, 0.0, math.inf, low_open=True, high_open=True)
    clamped = torch.clamp(snr, max=gamma)
    if prediction == "x_start":
        return clamped
    if prediction == "v":
        return clamped / (snr + 1.0)
    return clamped / snr


def edm_weight(snr: torch.Tensor, sigma_data: float, prediction: str) -> torch.Tensor:
    """EDM's loss weight (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
    Generative Models", Table 1, "Loss weighting"), lambda(sigma) = (sigma^2 + sigma_data^2) /
    (sigma sigma_data)^2 on the MSE of the denoised image, expressed on the MSE that
    :func:`training_losses` computes for ``prediction``.

    The chain's noise level is sigma_t = sqrt((1 - abar_t) / abar_t), so sigma_t^2 = 1 / SNR_t, and
    EDM's denoiser D(x; sigma) with x = x_t / sqrt(abar_t) = x_0 + sigma_t eps estimates x_0: its
    error is the x_0-error. Hence, on the x_0-MSE,

        lambda = (1/SNR_t + sigma_data^2) / (sigma_data^2 / SNR_t) = SNR_t + 1 / sigma_data^2.

    With the error relations of :func:`min_snr_weight` (x_0-MSE = eps-MSE / SNR_t, v-MSE =
    (SNR_t + 1) x_0-MSE, the lambda_t-weighted score MSE = eps-MSE), the weight that turns each
    MSE into lambda |dx_0|^2 is

    * "x_start": SNR_t + 1 / sigma_data^2;
    * "eps" and "score": (SNR_t + 1 / sigma_data^2) / SNR_t = 1 + sigma_t^2 / sigma_data^2;
    * "v": (SNR_t + 1 / sigma_data^2) / (SNR_t + 1), between 1 and 1 / sigma_data^2 (exactly 1
      for sigma_data = 1: the plain v-MSE is EDM's loss for sigma_data = 1).

    Preconditioning. EDM writes its denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), with
    c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),
    c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4, chosen so
    that F's input and target have unit variance and lambda c_out^2 = 1. This project keeps its
    network contract (input x_t, the integer timestep t, an eps / x_start / v / score output), so
    it takes only part of that:

    * c_in: the network sees x_t = sqrt(abar_t) x = x / sqrt(1 + sigma_t^2), EDM's c_in with
      sigma_data = 1 (for every prediction);
    * c_skip / c_out: "eps" is c_skip = 1, c_out = -sigma (EDM's Table 1, VP and VE columns);
      "x_start" is c_skip = 0, c_out = 1; "v" gives x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v =
      x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) v, i.e. c_skip = 1 / (1 + sigma^2) and
      c_out = -sigma / sqrt(1 + sigma^2): EDM's preconditioning with sigma_data = 1 (F = -v), the
      closest of the four;
    * c_noise: the integer timestep t, EDM's VP choice (Table 1: c_noise = (M - 1) t), not ln(sigma) / 4.

    It does not take EDM's sigma_data = 0.5 c_skip / c_out / c_in (a new output parameterization
    that every sampler and the exact bound would have to learn to read), nor c_noise = ln(sigma)/4.
    So ``loss_weighting="edm"`` with sigma_data = 0.5 gives EDM's weighting of the x_0-error,
    lambda |dx_0|^2, on the project's own parameterizations; with "v" and sigma_data = 1 it is
    exactly EDM's loss and preconditioning for sigma_data = 1 (weight 1).

    Args:
        snr: SNR_t of each example's timestep, float [N] (> 0).
        sigma_data: the data's standard deviation, a finite number > 0 (0.5 in the paper).
        prediction: "eps", "x_start", "v" or "score".

    Returns:
        float [N], ``snr``'s dtype and device.

    Raises:
        ValueError: on an unknown ``prediction`` or a ``sigma_data`` that is not a finite number > 0.
    """
    check_choice("prediction", prediction, Prediction)
    check_number_in("edm_sigma_data", sigma_data, 0.0, math.inf, low_open=True, high_open=True)
    x_start_weight = snr + 1.0 / float(sigma_data) ** 2
    if prediction == "x_start":
        return x_start_weight
    if prediction == "v":
        return x_start_weight / (snr + 1.0)
    return x_start_weight / snr


def loss_weight(snr: torch.Tensor, prediction: str, config: DiffusionConfig) -> torch.Tensor:
    """The per-example weight of the MSE for ``config.loss_weighting``: ones for "none",
    :func:`min_snr_weight` (``config.min_snr_gamma``) for "min_snr", :func:`edm_weight`
    (``config.edm_sigma_data``) for "edm". "min_snr" and "edm" make the weighted MSE equal
    min(SNR_t, gamma), resp. SNR_t + 1 / sigma_data^2, times the x_0-MSE whatever ``prediction``;
    "none" keeps each parameterization's plain MSE (SNR_t times the x_0-MSE for "eps" and "score",
    1 times it for "x_start", SNR_t + 1 times it for "v").

    Args:
        snr: SNR_t of each example's timestep, float [N] (> 0).
        prediction: "eps", "x_start", "v" or "score".
        config: the :class:`DiffusionConfig` whose ``loss_weighting`` and parameters apply.

    Returns:
        float [N], ``snr``'s dtype and device.

    Raises:
        ValueError: on an unknown ``prediction``.
    """
    check_choice("prediction", prediction, Prediction)
    check_choice("loss_weighting", config.loss_weighting, LossWeighting)
    if config.loss_weighting == "min_snr":
        return min_snr_weight(snr, config.min_snr_gamma, prediction)
    if config.loss_weighting == "edm":
        return edm_weight(snr, config.edm_sigma_data, prediction)
    return torch.ones_like(snr)


def training_losses(
    process: DiffusionProcess,
    model: Model,
    x_start: torch.Tensor,
    t: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
    generator: rng.Generator = None,
) -> dict[str, torch.Tensor]:
    """Per-image losses for one timestep per image, with one model call.

    x_t = q_sample(x_start, t, noise) is fed to the model, then (``process.config.loss``):

    * "simple": loss = mse = mean over C, H, W of (target - model_output)^2, where the target is
      eps, x_0 or v for ``prediction`` "eps", "x_start", "v" (Ho et al. 2020, eq. 14;
      Salimans & Ho 2022 for v). For "score" it is denoising score matching (Vincent 2011) with
      the weight lambda(t) = 1 - abar_t of Song et al. 2021 (score-based SDEs, eq. 7):
      mse = mean over C, H, W of (1 - abar_t) (s_theta - (-eps / sqrt(1 - abar_t)))^2
      = (sqrt(1 - abar_t) s_theta + eps)^2, which is the eps-MSE of the eps-model
      eps_theta = -sqrt(1 - abar_t) s_theta. "vb" is returned as zeros (not computed). With
      ``variance="learned_range"`` this leaves the variance channels untrained. With
      ``loss_weighting`` "min_snr" or "edm" the loss is w_t * mse, w_t = :func:`loss_weight` of
      the example's SNR_t, so that it equals min(SNR_t, gamma) (Hang et al. 2023) or
      SNR_t + 1 / sigma_data^2 (Karras et al. 2022) times the x_0-MSE whatever the prediction.
    * "vlb": loss = T * vb, where vb is the single bound term L_t in bits/dim (KL of eq. 5 for
      t > 0, the decoder NLL of eq. 13 at t = 0). With t uniform on [0, T), T * vb is an unbiased
      estimate of the bound without its prior term (improved-diffusion's scaling convention).
    * "hybrid": loss = mse + vlb_weight * T * vb', where vb' is vb computed with the predicted mean
      detached (stop-gradient), so the vb part only trains the variance channels (Nichol &
      Dhariwal 2021, sec. 3.1; vlb_weight = lambda = 0.001 there). With a fixed variance vb' has
      no gradient and only shifts the value. A ``loss_weighting`` other than "none" weights the mse
      part only: loss = w_t * mse + vlb_weight * T * vb'.

    Timestep importance weights (``pipelines.training.timestep_sampler``) are applied by the caller
    to "loss", so they multiply w_t. Which timesteps ``t`` holds (uniform, or EDM's distribution of
    ``config.timestep_distribution``) is the caller's draw too.

    Args:
        process: the diffusion process.
        model: callable (x_t [N,C,H,W], t [N]) -> [N, C or 2C, H, W].
        x_start: x_0, float [N, C, H, W] in [-1, 1] (vlb/hybrid assume the 256-level grid).
        t: int64 [N], 0-based timesteps in [0, T).
        noise: optional eps [N, C, H, W]; drawn with ``generator`` when None.
        generator: optional torch.Generator on x_start's device, or ``rng.RowGenerators``.

    Returns:
        dict of float tensors [N]: "loss" (what to minimise, mean it over the batch), "mse"
        (always computed, never weighted; unitless, per pixel), "vb" (bits/dim of the single term
        L_t, unscaled; zeros for loss="simple").

    Raises:
        ValueError: on bad shapes/dtypes, t outside [0, T), or a model output of the wrong shape.
    """
    process.check_inputs(x_start, t, "x_start")
    if noise is None:
        noise = rng.randn(x_start.shape, generator, device=x_start.device, dtype=x_start.dtype)
    check_same_shape(noise, x_start, "noise", "x_start")
    x_t = process.q_sample(x_start, t, noise)
    output = model(x_t, t)
    check_model_output(output, x_t, process.config.learn_sigma)
    channels = x_start.shape[1]
    if process.config.prediction == "score":
        # (1 - abar) |s_theta - (-eps / sqrt(1 - abar))|^2 = |sqrt(1 - abar) s_theta + eps|^2
        sigma = process.extract(process.sqrt_one_minus_alphas_cumprod, t, x_start)
        mse = mean_flat((sigma * output[:, :channels] + noise) ** 2)
    else:
        target = process.training_target(x_start, t, noise)
        mse = mean_flat((target - output[:, :channels]) ** 2)
    weighted = mse
    if process.config.loss_weighting != "none":
        snr = process.extract(process.snr, t, mse)
        weighted = loss_weight(snr, process.config.prediction, process.config) * mse
    loss_type = process.config.loss
    if loss_type == "simple":
        return {"loss": weighted, "mse": mse, "vb": torch.zeros_like(mse)}
    scale = float(process.num_timesteps)
    if loss_type == "vlb":
        vb = vb_terms_bpd(process, output, x_start, x_t, t)["output"]
        return {"loss": vb * scale, "mse": mse.detach(), "vb": vb}
    frozen = output.detach() if output.shape[1] == channels else torch.cat(
        [output[:, :channels].detach(), output[:, channels:]], dim=1
    )
    vb = vb_terms_bpd(process, frozen, x_start, x_t, t)["output"]
    return {"loss": weighted + process.config.vlb_weight * scale * vb, "mse": mse, "vb": vb}
