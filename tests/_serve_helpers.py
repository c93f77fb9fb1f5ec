"""Shared pieces of the Serve tests: Fashion-MNIST images (and labels) read from the IDX files, and a
tiny model trained for a few dozen steps, saved with ``save_checkpoint`` and registered in a SQLite
MLflow registry; likewise a tiny class-conditional model registered with the Fashion-MNIST class
names in its data manifest. The private Ray cluster they are served on is ``tooling.local_cluster``."""

from __future__ import annotations

import dataclasses
import gzip
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient

from diffusion_core import DiffusionConfig, GaussianDiffusion, UNet, UNetConfig
from diffusion_core.checkpoint import save_checkpoint
from diffusion_core.guidance import with_class_labels
from diffusion_core.images import uint8_to_float
from pipelines.registry.model_store import ModelRef, log_checkpoint_model
from pipelines.registry.tracking_uri import ensure_experiment, mlflow_store

TINY_UNET = UNetConfig(
    image_size=28, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2),
    num_res_blocks=1, attention_resolutions=(14,), dropout=0.0, num_groups=4, num_heads=1,
)
TINY_DIFFUSION = DiffusionConfig(num_timesteps=40)
MODEL_NAME = "ddpm-serve-test"
TINY_COND_UNET = dataclasses.replace(TINY_UNET, num_classes=10)
COND_MODEL_NAME = "ddpm-serve-cond"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
"""Fashion-MNIST's class names, label i = name i (the dataset's documented order)."""


def read_idx_images(path: Path, limit: int) -> np.ndarray:
    """The first ``limit`` images of an IDX3 .gz file as uint8 [N, 28, 28] (16-byte big-endian header)."""
    with gzip.open(path, "rb") as f:
        header = np.frombuffer(f.read(16), dtype=">i4")
        if header[0] != 2051:
            raise ValueError(f"{path} is not an IDX3 image file (magic {header[0]})")
        _, _, rows, cols = (int(v) for v in header)
        data = np.frombuffer(f.read(limit * rows * cols), dtype=np.uint8)
    return data.reshape(-1, rows, cols)


def read_idx_labels(path: Path, limit: int) -> np.ndarray:
    """The first ``limit`` labels of an IDX1 .gz file as int64 [N] (8-byte big-endian header)."""
    with gzip.open(path, "rb") as f:
        header = np.frombuffer(f.read(8), dtype=">i4")
        if header[0] != 2049:
            raise ValueError(f"{path} is not an IDX1 label file (magic {header[0]})")
        return np.frombuffer(f.read(limit), dtype=np.uint8).astype(np.int64)


def train_tiny(images: np.ndarray, steps: int, seed: int, init: dict[str, torch.Tensor] | None = None,
               labels: np.ndarray | None = None) -> UNet:
    """Train ``TINY_UNET`` for ``steps`` Adam steps (batch 32, lr 2e-3) on uint8 [N, 28, 28] images,
    single-threaded (several torch threads on a shared 2-core machine are many times slower). With
    ``labels`` (int64 [N] in [0, 10)), ``TINY_COND_UNET`` with each row's label dropped to -1 with
    probability 0.2 (classifier-free guidance's label dropout)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(images, steps, seed, init, labels)
    finally:
        torch.set_num_threads(threads)


def _train(images: np.ndarray, steps: int, seed: int, init: dict[str, torch.Tensor] | None,
           labels: np.ndarray | None) -> UNet:
    torch.manual_seed(seed)
    model = UNet(TINY_UNET if labels is None else TINY_COND_UNET)
    if init is not None:
        model.load_state_dict(init)
    diffusion = GaussianDiffusion(TINY_DIFFUSION)
    data = torch.from_numpy(uint8_to_float(images)[:, None])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (32,), generator=generator)
        t = torch.randint(0, TINY_DIFFUSION.num_timesteps, (32,), generator=generator)
        network = model
        if labels is not None:
            y = torch.from_numpy(labels)[idx]
            y = torch.where(torch.rand(32, generator=generator) < 0.2, torch.full_like(y, -1), y)
            network = with_class_labels(model, y)
        loss = diffusion.training_losses(network, data[idx], t, generator=generator)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@dataclass(frozen=True)
class RegisteredModels:
    """Two registered versions of the tiny model (v2 trains v1 further; alias "champion" -> v2)."""

    tracking_uri: str
    v1: ModelRef
    v2: ModelRef
    checkpoint_v1: Path
    checkpoint_v2: Path


def save_tiny_checkpoint(folder: Path, fashion_mnist_dir: Path, steps: int = 12) -> Path:
    """Train the tiny model on 512 Fashion-MNIST training images and ``save_checkpoint`` it to ``folder``."""
    images = read_idx_images(fashion_mnist_dir / "train-images-idx3-ubyte.gz", 512)
    model = train_tiny(images, steps, seed=0)
    return save_checkpoint(folder, model.state_dict(), TINY_UNET, TINY_DIFFUSION, {"step": steps})


def register_tiny_models(root: Path, fashion_mnist_dir: Path, steps: int = 24) -> RegisteredModels:
    """Train, save (``save_checkpoint``) and register two versions in a SQLite MLflow under ``root``."""
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    images = read_idx_images(fashion_mnist_dir / "train-images-idx3-ubyte.gz", 512)
    first = train_tiny(images, steps, seed=0)
    second = train_tiny(images, steps // 2, seed=1, init=first.state_dict())
    ckpt1 = save_checkpoint(root / "ckpt-v1", first.state_dict(), TINY_UNET, TINY_DIFFUSION, {"step": steps})
    ckpt2 = save_checkpoint(root / "ckpt-v2", second.state_dict(), TINY_UNET, TINY_DIFFUSION,
                            {"step": steps + steps // 2})
    with mlflow_store(tracking_uri):
        client = MlflowClient(tracking_uri)
        experiment_id = ensure_experiment(client, "serve-test", tracking_uri)
        refs = []
        for ckpt in (ckpt1, ckpt2):
            with mlflow.start_run(experiment_id=experiment_id):
                refs.append(log_checkpoint_model(ckpt, registered_model_name=MODEL_NAME,
                                                 manifest={"schema_version": 1, "source": "fashion-mnist",
                                                           "counts": {"train": 512, "val": 0}, "rejected": []}))
        client.set_registered_model_alias(MODEL_NAME, "champion", refs[1].version)
    return RegisteredModels(tracking_uri, refs[0], refs[1], ckpt1, ckpt2)


@dataclass(frozen=True)
class ConditionalModel:
    """The tiny class-conditional model registered as ``models:/ddpm-serve-cond/1``."""

    ref: ModelRef
    checkpoint: Path


def register_tiny_conditional_model(root: Path, tracking_uri: str, fashion_mnist_dir: Path,
                                    steps: int = 24) -> ConditionalModel:
    """Train ``TINY_COND_UNET`` on 512 labelled Fashion-MNIST images, save it and register it in the
    MLflow store ``tracking_uri`` with a data manifest whose ``classes`` are ``FASHION_MNIST_CLASSES``
    (what ``pipelines/preprocess.py --class-names`` records), which the served model reads its names from."""
    images = read_idx_images(fashion_mnist_dir / "train-images-idx3-ubyte.gz", 512)
    labels = read_idx_labels(fashion_mnist_dir / "train-labels-idx1-ubyte.gz", 512)
    model = train_tiny(images, steps, seed=2, labels=labels)
    folder = save_checkpoint(root / "ckpt-cond", model.state_dict(), TINY_COND_UNET, TINY_DIFFUSION, {"step": steps})
    manifest = {"schema_version": 1, "source": "fashion-mnist", "counts": {"train": 512, "val": 0}, "rejected": [],
                "has_labels": True, "classes": list(FASHION_MNIST_CLASSES)}
    with mlflow_store(tracking_uri):
        experiment_id = ensure_experiment(MlflowClient(tracking_uri), "serve-test", tracking_uri)
        with mlflow.start_run(experiment_id=experiment_id):
            ref = log_checkpoint_model(folder, registered_model_name=COND_MODEL_NAME, manifest=manifest)
    return ConditionalModel(ref, folder)
