"""A small CNN classifier trained on the project's own labelled shards, used as the FD's feature
network for data Inception-v3 was not made for (28x28 grey Fashion-MNIST): features are its
penultimate layer (``feature_dim``, 128 by default, after the ReLU).

Saved like a core checkpoint: ``model.safetensors`` + ``config.json``
(``{"kind": "fd-classifier", "format_version": 1, "config": ClassifierConfig, "metadata": {...}}``);
no pickle. ``pipelines/train_classifier.py`` is the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME

KIND = "fd-classifier"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of the classifier.

    Attributes:
        image_shape: ``(C, H, W)`` of its inputs (float32 in [-1, 1]).
        num_classes: K >= 2 logits.
        channels: channels of the two conv blocks (conv 3x3 + ReLU + 2x2 max-pool each).
        feature_dim: D, width of the penultimate (feature) layer.
    """

    image_shape: tuple[int, int, int]
    num_classes: int = 10
    channels: tuple[int, int] = (32, 64)
    feature_dim: int = 128

    def __post_init__(self) -> None:
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"classifier.image_shape must be (C, H, W) of positive ints, got {self.image_shape}")
        if self.num_classes < 2 or self.feature_dim < 1 or len(self.channels) != 2 or min(self.channels) < 1:
            raise ValueError(f"classifier: num_classes >= 2, feature_dim >= 1 and two positive channels needed, "
                             f"got {self.num_classes}, {self.feature_dim}, {self.channels}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassifierConfig:
        return cls(image_shape=tuple(data["image_shape"]), num_classes=int(data["num_classes"]),
                   channels=tuple(data["channels"]), feature_dim=int(data["feature_dim"]))


class SmallCNN(nn.Module):
    """conv(C->c1) ReLU pool, conv(c1->c2) ReLU pool, adaptive-avg-pool to 4x4, linear -> D, ReLU
    (the features), linear -> K (the logits)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        c_in, (c1, c2) = config.image_shape[0], config.channels
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c2 * 16, config.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, C, H, W]`` in [-1, 1] -> ``[N, feature_dim]`` (penultimate layer)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, C, H, W]`` -> logits ``[N, num_classes]``."""
        return self.head(self.body(x))


def weights_digest(model: nn.Module) -> str:
    """``"sha256:<hex>"`` of the state dict (sorted names, dtypes, shapes and bytes): the network's
    identity in the FD cache key."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def accuracy(model: SmallCNN, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Fraction of ``images`` (float32 ``[N, C, H, W]``) whose argmax logit is the int label; NaN if N = 0."""
    if len(images) == 0:
        return float("nan")
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            logits = model(torch.from_numpy(images[i : i + batch_size]))
            correct += int((logits.argmax(dim=1).numpy() == labels[i : i + batch_size]).sum())
    return correct / len(images)


def train_classifier(
    images: np.ndarray, labels: np.ndarray, config: ClassifierConfig, epochs: int, batch_size: int = 64,
    lr: float = 1e-3, seed: int = 0,
) -> tuple[SmallCNN, list[float]]:
    """Train ``SmallCNN(config)`` with Adam on cross-entropy, on CPU, shuffling each epoch.

    Args:
        images: float32 ``[N, C, H, W]`` in [-1, 1]; labels: int64 ``[N]`` in [0, K).
        epochs: passes over the data (>= 1); seed: seed of the init and the shuffles.

    Returns:
        ``(model in eval mode, mean training loss of each epoch in nats)``.

    Raises:
        ValueError: on unlabelled rows (label -1), labels >= K, shape mismatches or epochs < 1.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if images.shape[1:] != tuple(config.image_shape) or len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"images {list(images.shape)} / labels {list(labels.shape)} do not fit "
                         f"image_shape {list(config.image_shape)}")
    if labels.min() < 0 or labels.max() >= config.num_classes:
        raise ValueError(f"labels must lie in [0, {config.num_classes}) (unlabelled shards have -1), "
                         f"got [{labels.min()}, {labels.max()}]")
    torch.manual_seed(seed)
    model = SmallCNN(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    losses = []
    for _ in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(images)))
        total = 0.0
        for i in range(0, len(images), batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        losses.append(total / len(images))
    return model.eval(), losses


def save_classifier(directory: str | os.PathLike[str], model: SmallCNN, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``directory`` (created); returns it, absolute."""
    folder = Path(directory).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_NAME))
    config = {"kind": KIND, "format_version": FORMAT_VERSION, "config": asdict(model.config),
              "metadata": {**(metadata or {}), "weights_sha256": weights_digest(model)}}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def load_classifier(directory: str | os.PathLike[str]) -> tuple[SmallCNN, dict[str, Any]]:
    """Rebuild a saved classifier (eval mode, CPU) and return it with its metadata.

    Raises:
        FileNotFoundError: if a file is missing; ValueError: if ``config.json`` is not an
            fd-classifier config or the weights do not fit it.
    """
    folder = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"classifier folder {folder.resolve()} has no {name}")
    data = json.loads((folder / CONFIG_NAME).read_text())
    if data.get("kind") != KIND:
        raise ValueError(f"{folder.resolve() / CONFIG_NAME} is not an fd-classifier config (kind={data.get('kind')!r}); "
                         "make one with pipelines/train_classifier.py")
    model = SmallCNN(ClassifierConfig.from_dict(data["config"]))
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    except RuntimeError as err:
        raise ValueError(f"classifier weights in {folder.resolve()} do not fit its config: {err}") from err
    return model.eval(), dict(data.get("metadata", {}))


class ClassifierFeatures:
    """``FeatureNet`` of a trained classifier: its penultimate layer, float64 ``[N, feature_dim]``."""

    def __init__(self, model: SmallCNN) -> None:
        self.model = model.eval()
        self.dim = model.config.feature_dim
        self.identity = f"classifier:{weights_digest(model)}"
        self.image_shape = tuple(model.config.image_shape)

    def features(self, images: np.ndarray) -> np.ndarray:
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"the classifier takes images of shape {list(self.image_shape)}, "
                             f"got {list(images.shape[1:])}")
        with torch.no_grad():
            return self.model.features(torch.from_numpy(np.ascontiguousarray(images, np.float32))).double().numpy()
