"""Frozen, validated configuration dataclasses for the diffusion process and the UNet.

Both configs round-trip through plain dicts (``to_dict`` / ``from_dict``), which is how they are
written beside every checkpoint (JSON) and read from the YAML training configs. Unknown keys and
out-of-range values raise ``ValueError`` naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, TypeVar

from diffusion_core.validation import check_choice, check_number_in, check_positive_int

Schedule = Literal["linear", "cosine"]
Prediction = Literal["eps", "x_start", "v", "score"]
Variance = Literal["fixed_small", "fixed_large", "learned_range"]
Loss = Literal["simple", "vlb", "hybrid"]
LossWeighting = Literal["none", "min_snr", "edm"]
TimestepDistribution = Literal["uniform", "edm_lognormal"]

_C = TypeVar("_C")


def config_from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
    """Build a config dataclass from a mapping, rejecting unknown keys.

    Sequence-valued fields given as lists (JSON/YAML) are converted to tuples.

    Raises:
        TypeError: if ``data`` is not a mapping.
        ValueError: on a key that ``cls`` does not define (the message lists the known keys),
            or on any value that ``cls.__post_init__`` rejects.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; known keys are {names}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


#: ``DiffusionConfig`` keys that ``to_dict`` leaves out, a group at a time, while they hold their defaults.
_OPTIONAL_GROUPS = (("loss_weighting", "min_snr_gamma"), ("edm_sigma_data",),
                    ("timestep_distribution", "edm_p_mean", "edm_p_std"))


@dataclass(frozen=True)
class DiffusionConfig:
    """Settings of the Gaussian diffusion process (Ho et al. 2020; Nichol & Dhariwal 2021).

    Attributes:
        num_timesteps: T, the number of diffusion steps (>= 2). Timesteps are 0-based: index t
            is the paper's t+1, index 0 is the decoder step p(x_0|x_1).
        schedule: "linear" (betas from 1e-4*(1000/T) to 0.02*(1000/T), Ho et al. 2020 sec. 4)
            or "cosine" (s = 0.008, betas capped at 0.999; Nichol & Dhariwal 2021 eq. 17).
        prediction: what the network outputs in its first C channels: the noise "eps", the clean
            image "x_start", the velocity "v" = sqrt(abar)*eps - sqrt(1-abar)*x_0
            (Salimans & Ho 2022), or the "score" grad log q(x_t) = -eps / sqrt(1-abar)
            (Song et al. 2021, score-based SDEs; trained by denoising score matching weighted by 1-abar).
        variance: reverse-process variance: "fixed_small" (posterior beta-tilde), "fixed_large"
            (beta_t), or "learned_range" (the network's last C channels interpolate
            log beta-tilde and log beta; Nichol & Dhariwal 2021 eq. 15).
        loss: "simple" (MSE on the parameterized target, Ho et al. eq. 14), "vlb" (the true
            variational bound terms in bits/dim), or "hybrid" (simple + vlb_weight * vlb with the
            mean stopped in the vlb term; Nichol & Dhariwal 2021 sec. 3.1).
        vlb_weight: lambda of the hybrid loss (0.001 in Nichol & Dhariwal 2021).
        loss_weighting: per-timestep weight of the MSE of the "simple" loss and of the MSE part of
            "hybrid": "none" (every timestep weighted as its parameterization's plain MSE);
            "min_snr", Min-SNR-gamma (Hang et al. 2023, sec. 3.4): the MSE is weighted so that it
            equals min(SNR_t, gamma) times the x_0-MSE, with SNR_t = abar_t / (1 - abar_t)
            (see ``diffusion_core.losses.min_snr_weight``); or "edm", EDM's loss weight (Karras et
            al. 2022, Table 1): the MSE equals lambda(sigma_t) = (sigma_t^2 + sigma_data^2) /
            (sigma_t sigma_data)^2 = SNR_t + 1 / sigma_data^2 times the x_0-MSE, with
            sigma_t^2 = 1 / SNR_t (see ``diffusion_core.losses.edm_weight``). "min_snr" and "edm"
            need loss "simple" or "hybrid"; the VLB term is never weighted.
        min_snr_gamma: gamma of "min_snr", a finite number > 0 (5 in Hang et al. 2023); read only
            when ``loss_weighting`` is "min_snr".
        edm_sigma_data: sigma_data of "edm", the data's standard deviation, a finite number > 0
            (0.5 in Karras et al. 2022); read only when ``loss_weighting`` is "edm".
        timestep_distribution: which timesteps training draws: "uniform" (t uniform on [0, T), Ho et
            al. 2020), or "edm_lognormal", EDM's ln sigma ~ N(edm_p_mean, edm_p_std^2) (Karras et al.
            2022, Table 1) snapped to the chain's timesteps
            (``diffusion_core.timesteps.edm_lognormal_probabilities``). "edm_lognormal" needs loss
            "simple" or "hybrid" (the "vlb" loss estimates the bound from uniform timesteps). Only
            training reads it; sampling and the bound do not.
        edm_p_mean, edm_p_std: P_mean (a finite number) and P_std (a finite number > 0) of
            "edm_lognormal" (-1.2 and 1.2 in Karras et al. 2022).
    """

    num_timesteps: int = 1000
    schedule: Schedule = "linear"
    prediction: Prediction = "eps"
    variance: Variance = "fixed_small"
    loss: Loss = "simple"
    vlb_weight: float = 0.001
    loss_weighting: LossWeighting = "none"
    min_snr_gamma: float = 5.0
    edm_sigma_data: float = 0.5
    timestep_distribution: TimestepDistribution = "uniform"
    edm_p_mean: float = -1.2
    edm_p_std: float = 1.2

    def __post_init__(self) -> None:
        check_positive_int("num_timesteps", self.num_timesteps)
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps={self.num_timesteps} must be >= 2")
        check_choice("schedule", self.schedule, Schedule)
        check_choice("prediction", self.prediction, Prediction)
        check_choice("variance", self.variance, Variance)
        check_choice("loss", self.loss, Loss)
        if not (isinstance(self.vlb_weight, (int, float)) and self.vlb_weight >= 0):
            raise ValueError(f"vlb_weight={self.vlb_weight!r} must be a number >= 0")
        check_choice("loss_weighting", self.loss_weighting, LossWeighting)
        check_number_in("min_snr_gamma", self.min_snr_gamma, 0.0, math.inf, low_open=True, high_open=True)
        check_number_in("edm_sigma_data", self.edm_sigma_data, 0.0, math.inf, low_open=True, high_open=True)
        check_choice("timestep_distribution", self.timestep_distribution, TimestepDistribution)
        check_number_in("edm_p_mean", self.edm_p_mean, -math.inf, math.inf, low_open=True, high_open=True)
        check_number_in("edm_p_std", self.edm_p_std, 0.0, math.inf, low_open=True, high_open=True)
        if self.loss_weighting != "none" and self.loss == "vlb":
            raise ValueError(
                f"loss_weighting={self.loss_weighting!r} needs loss 'simple' or 'hybrid', not {self.loss!r} "
                "(the variational bound is not reweighted)"
            )
        if self.timestep_distribution != "uniform" and self.loss == "vlb":
            raise ValueError(
                f"timestep_distribution={self.timestep_distribution!r} needs loss 'simple' or 'hybrid', not "
                f"{self.loss!r} (the 'vlb' loss estimates the bound from uniformly drawn timesteps)"
            )

    @property
    def learn_sigma(self) -> bool:
        """True when the network outputs 2C channels (variance == "learned_range")."""
        return self.variance == "learned_range"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON/YAML-serializable). Each group of optional keys is left out while
        all its keys hold their defaults: ``loss_weighting`` and ``min_snr_gamma`` ("none", 5.0);
        ``edm_sigma_data`` (0.5); ``timestep_distribution``, ``edm_p_mean`` and ``edm_p_std``
        ("uniform", -1.2, 1.2). So the ``config.json`` of a model trained without these options has
        the same keys whether or not the reader knows them; :meth:`from_dict` reads missing keys as
        their defaults."""
        data = dataclasses.asdict(self)
        fields = {f.name: f for f in dataclasses.fields(self)}
        for group in _OPTIONAL_GROUPS:
            if all(data[name] == fields[name].default for name in group):
                for name in group:
                    del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DiffusionConfig":
        """Inverse of ``to_dict``; raises ``ValueError`` on unknown keys or bad values."""
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the UNet of Ho et al. 2020 (appendix B), built by ``diffusion_core.UNet``.

    Attributes:
        image_size: H (= W) of the input in pixels; must be divisible by 2**(len(channel_mult)-1).
        in_channels: C of the images, 1 (grayscale) or 3 (RGB).
        out_channels: C or 2C (2C when the diffusion's variance is "learned_range").
        model_channels: base channel count ("ch"; 128 for Ho et al.'s CIFAR-10 model).
        channel_mult: per-resolution multipliers of ``model_channels`` ((1, 2, 2, 2) for CIFAR-10).
        num_res_blocks: residual blocks per resolution on the way down (2 for CIFAR-10).
        attention_resolutions: feature-map sizes in pixels at which self-attention is applied
            ((16,) for CIFAR-10 32x32).
        dropout: dropout probability inside residual blocks (0.1 for CIFAR-10).
        num_groups: GroupNorm groups (32 in Ho et al.); must divide every channel count.
        num_heads: attention heads; must divide the channel count where attention is applied.
        num_classes: None (an unconditional model, ``model(x_t, t)``) or K >= 1 for a
            class-conditional model ``model(x_t, t, class_labels)`` with labels in [0, K) and -1 =
            "no label": a learned class embedding of K + 1 rows (row K = "no label") is added to
            the timestep embedding (Dhariwal & Nichol 2021, improved-diffusion's ``label_emb``), so
            one network learns p(x | y) and p(x) for classifier-free guidance (Ho & Salimans 2022).
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    num_heads: int = 1
    num_classes: int | None = None

    def __post_init__(self) -> None:
        for name in ("image_size", "model_channels", "num_res_blocks", "num_groups", "num_heads"):
            check_positive_int(name, getattr(self, name))
        if self.num_classes is not None:
            check_positive_int("num_classes", self.num_classes)
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels={self.in_channels!r} must be 1 or 3")
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(
                f"out_channels={self.out_channels!r} must be in_channels ({self.in_channels}) "
                f"or 2*in_channels ({2 * self.in_channels})"
            )
        if not self.channel_mult or not all(
            isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in self.channel_mult
        ):
            raise ValueError(f"channel_mult={self.channel_mult!r} must be a non-empty tuple of positive ints")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**(len(channel_mult)-1) = {factor}"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.num_groups:
                raise ValueError(
                    f"num_groups={self.num_groups} must divide every channel count "
                    f"(model_channels*mult = {self.model_channels * mult})"
                )
        resolutions = {self.image_size // 2**i for i in range(len(self.channel_mult))}
        for res in self.attention_resolutions:
            if res not in resolutions:
                raise ValueError(
                    f"attention_resolutions entry {res} is not one of the feature-map sizes {sorted(resolutions)}"
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape of one image, ``(C, H, W)`` = ``(in_channels, image_size, image_size)``."""
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def conditional(self) -> bool:
        """True for a class-conditional model (``num_classes`` is set)."""
        return self.num_classes is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (tuples become lists in JSON/YAML). ``num_classes`` is left out when it is
        None, so an unconditional model's ``config.json`` and logged parameters have the same keys
        whether or not the reader knows the field; :meth:`from_dict` reads a missing key as None."""
        data = dataclasses.asdict(self)
        if data["num_classes"] is None:
            del data["num_classes"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNetConfig":
        """Inverse of ``to_dict``; raises ``ValueError`` on unknown keys or bad values."""
        return config_from_dict(cls, data)


def check_out_channels(unet_config: UNetConfig, diffusion_config: DiffusionConfig) -> None:
    """Require the UNet's output channels to fit the diffusion's variance setting: ``2 * in_channels``
    for "learned_range" (the second half interpolates the log-variance), else ``in_channels``.

    Raises:
        ValueError: naming ``model.out_channels``, ``diffusion.variance`` and the needed count.
    """
    expected = unet_config.in_channels * (2 if diffusion_config.learn_sigma else 1)
    if unet_config.out_channels != expected:
        raise ValueError(
            f"model.out_channels={unet_config.out_channels} does not fit diffusion.variance="
            f"{diffusion_config.variance!r}, which needs out_channels={expected}"
        )
