"""Training losses of DDPM: "simple" (Ho et al. 2020, eq. 14), "vlb" (the true bound terms) and
"hybrid" (Nichol & Dhariwal 2021, eq. 16 with the stop-gradient of sec. 3.1).

Called through :meth:`GaussianDiffusion.training_losses`.
"""

from __future__ import annotations

from typing import Optional

import torch

from diffusion_core import rng
from diffusion_core.bound import mean_flat, vb_terms_bpd
from diffusion_core.process import DiffusionProcess
from diffusion_core.types import Model
from diffusion_core.validation import check_model_output, check_same_shape


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
      ``variance="learned_range"`` this leaves the variance channels untrained.
    * "vlb": loss = T * vb, where vb is the single bound term L_t in bits/dim (KL of eq. 5 for
      t > 0, the decoder NLL of eq. 13 at t = 0). With t uniform on [0, T), T * vb is an unbiased
      estimate of the bound without its prior term (improved-diffusion's scaling convention).
    * "hybrid": loss = mse + vlb_weight * T * vb', where vb' is vb computed with the predicted mean
      detached (stop-gradient), so the vb part only trains the variance channels (Nichol &
      Dhariwal 2021, sec. 3.1; vlb_weight = lambda = 0.001 there). With a fixed variance vb' has
      no gradient and only shifts the value.

    Args:
        process: the diffusion process.
        model: callable (x_t [N,C,H,W], t [N]) -> [N, C or 2C, H, W].
        x_start: x_0, float [N, C, H, W] in [-1, 1] (vlb/hybrid assume the 256-level grid).
        t: int64 [N], 0-based timesteps in [0, T).
        noise: optional eps [N, C, H, W]; drawn with ``generator`` when None.
        generator: optional torch.Generator on x_start's device, or ``rng.RowGenerators``.

    Returns:
        dict of float tensors [N]: "loss" (what to minimise, mean it over the batch), "mse"
        (always computed; unitless, per pixel), "vb" (bits/dim of the single term L_t, unscaled;
        zeros for loss="simple").

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
    loss_type = process.config.loss
    if loss_type == "simple":
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
    scale = float(process.num_timesteps)
    if loss_type == "vlb":
        vb = vb_terms_bpd(process, output, x_start, x_t, t)["output"]
        return {"loss": vb * scale, "mse": mse.detach(), "vb": vb}
    frozen = output.detach() if output.shape[1] == channels else torch.cat(
        [output[:, :channels].detach(), output[:, channels:]], dim=1
    )
    vb = vb_terms_bpd(process, frozen, x_start, x_t, t)["output"]
    return {"loss": mse + process.config.vlb_weight * scale * vb, "mse": mse, "vb": vb}
