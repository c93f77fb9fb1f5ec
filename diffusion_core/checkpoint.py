"""Save and load a model checkpoint folder: ``model.safetensors`` + ``config.json``. No pickle.

``config.json`` is ``{"format_version": 1, "unet": UNetConfig.to_dict(), "diffusion":
DiffusionConfig.to_dict(), "metadata": {...}}``; the UNet and the GaussianDiffusion are rebuilt
from that file alone. Folders are local paths (``str`` or ``Path``); remote URIs are resolved by
``pipelines`` before they get here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffusion_core.config import DiffusionConfig, UNetConfig, check_out_channels
from diffusion_core.unet import UNet

if TYPE_CHECKING:
    from diffusion_core.diffusion import GaussianDiffusion

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint rebuilt by ``load_checkpoint``.

    Attributes:
        model: the ``UNet`` with the saved weights, in eval mode, on the requested device.
        diffusion: the ``GaussianDiffusion`` built from ``diffusion_config``.
        unet_config: the saved ``UNetConfig``.
        diffusion_config: the saved ``DiffusionConfig``.
        metadata: the saved free-form JSON metadata (e.g. step, run id); ``{}`` when none.
    """

    model: UNet
    diffusion: "GaussianDiffusion"
    unet_config: UNetConfig
    diffusion_config: DiffusionConfig
    metadata: dict[str, Any]


def _check_state_dict(state_dict: Mapping[str, torch.Tensor], unet_config: UNetConfig) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has exactly the keys and shapes of ``UNet(unet_config)``."""
    with torch.device("meta"):
        reference = UNet(unet_config).state_dict()
    missing = sorted(set(reference) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(reference))
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the UNet config: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]} (a DDP/compiled model's keys carry a "
            "'module.'/'_orig_mod.' prefix: save the unwrapped model's state_dict)"
        )
    for key, ref in reference.items():
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(ref.shape):
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"weights do not match the UNet config: {key} has shape {got}, expected {tuple(ref.shape)}"
            )


def save_checkpoint(
    directory: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    unet_config: UNetConfig,
    diffusion_config: DiffusionConfig,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created if needed).

    Tensors are saved contiguous, on CPU, in their own dtype. Each file is written to a temporary
    name and renamed into place, so an error leaves no half-written checkpoint file behind; an
    existing checkpoint in ``directory`` is replaced.

    Args:
        directory: local folder (``str`` or ``Path``).
        state_dict: the UNet's ``state_dict()`` (unwrapped: no ``module.`` prefix).
        unet_config: the architecture the weights belong to.
        diffusion_config: the diffusion process the model was trained for.
        metadata: JSON-serializable mapping with string keys (e.g. ``{"step": 1000}``).

    Returns:
        The absolute folder path.

    Raises:
        TypeError: if a config has the wrong type or ``metadata`` is not JSON-serializable.
        ValueError: if the weights' keys/shapes do not match ``unet_config`` or the UNet's
            ``out_channels`` does not fit the diffusion's variance setting.
    """
    if not isinstance(unet_config, UNetConfig) or not isinstance(diffusion_config, DiffusionConfig):
        raise TypeError(
            f"expected UNetConfig and DiffusionConfig, got {type(unet_config).__name__} and "
            f"{type(diffusion_config).__name__}"
        )
    check_out_channels(unet_config, diffusion_config)
    _check_state_dict(state_dict, unet_config)
    payload = {
        "format_version": FORMAT_VERSION,
        "unet": unet_config.to_dict(),
        "diffusion": diffusion_config.to_dict(),
        "metadata": dict(metadata or {}),
    }
    try:
        config_text = json.dumps(payload, indent=2, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint metadata must be JSON-serializable: {err}") from err
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}

    folder = Path(directory).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    weights_tmp = folder / f".{WEIGHTS_NAME}.tmp"
    config_tmp = folder / f".{CONFIG_NAME}.tmp"
    try:
        save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
        config_tmp.write_text(config_text + "\n", encoding="utf-8")
        os.replace(weights_tmp, folder / WEIGHTS_NAME)
        os.replace(config_tmp, folder / CONFIG_NAME)
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
    return folder


def _existing_file(directory: str | os.PathLike[str], name: str) -> Path:
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder.resolve()} does not exist")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path.resolve()} does not exist")
    return path


def read_checkpoint_config(directory: str | os.PathLike[str]) -> tuple[UNetConfig, DiffusionConfig, dict[str, Any]]:
    """Read ``config.json`` of a checkpoint folder without touching the weights.

    Returns:
        ``(unet_config, diffusion_config, metadata)``.

    Raises:
        FileNotFoundError: if the folder or its ``config.json`` is missing (the message names the path).
        ValueError: if ``config.json`` is not valid JSON, has a ``format_version`` other than 1,
            lacks the ``unet``/``diffusion`` sections, holds invalid config values, or the UNet's
            ``out_channels`` does not fit the diffusion's variance setting.
    """
    path = _existing_file(directory, CONFIG_NAME)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt checkpoint config {path.resolve()}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise ValueError(
            f"{path.resolve()}: format_version={version!r}; this code reads format_version {FORMAT_VERSION}"
        )
    missing = [k for k in ("unet", "diffusion") if not isinstance(payload.get(k), dict)]
    if missing:
        raise ValueError(f"{path.resolve()}: missing or non-object section(s) {missing}")
    metadata = payload.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path.resolve()}: metadata must be a JSON object, got {type(metadata).__name__}")
    try:
        unet_config = UNetConfig.from_dict(payload["unet"])
        diffusion_config = DiffusionConfig.from_dict(payload["diffusion"])
        check_out_channels(unet_config, diffusion_config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path.resolve()}: invalid config: {err}") from err
    return unet_config, diffusion_config, metadata


def load_checkpoint(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the UNet (eval mode, on ``device``) and the GaussianDiffusion of a checkpoint folder.

    Raises:
        FileNotFoundError: if the folder, ``config.json`` or ``model.safetensors`` is missing.
        ValueError: if ``config.json`` is invalid (see ``read_checkpoint_config``), the weights file
            is not a readable safetensors file, or its tensors do not match the configured UNet.
    """
    from diffusion_core.diffusion import GaussianDiffusion  # lazy: keeps this module light

    unet_config, diffusion_config, metadata = read_checkpoint_config(directory)
    weights = _existing_file(directory, WEIGHTS_NAME)
    try:
        state_dict = load_file(str(weights), device="cpu")
    except SafetensorError as err:
        raise ValueError(f"corrupt weights file {weights.resolve()}: {err}") from err
    try:
        _check_state_dict(state_dict, unet_config)
    except ValueError as err:
        raise ValueError(f"{weights.resolve()}: {err}") from err
    model = UNet(unet_config)
    model.load_state_dict(state_dict, strict=True)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        diffusion=GaussianDiffusion(diffusion_config),
        unet_config=unet_config,
        diffusion_config=diffusion_config,
        metadata=metadata,
    )
