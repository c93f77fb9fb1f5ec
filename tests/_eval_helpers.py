"""What the end-to-end ``pipelines/evaluate.py`` tests share: a small 28x28 UNet whose output depends on its
input, saved as a checkpoint, and the newest MLflow run of an experiment."""

from __future__ import annotations

from pathlib import Path

from _unet_helpers import computing_unet
from mlflow import MlflowClient

from diffusion_core.checkpoint import save_checkpoint
from diffusion_core.config import DiffusionConfig, UNetConfig

#: one resolution, no attention: Fashion-MNIST-shaped and fast on a CPU
UNET_28 = UNetConfig(image_size=28, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,),
                     num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_groups=4)


def save_computing_checkpoint(folder: Path) -> Path:
    """``computing_unet(UNET_28)`` with ``DiffusionConfig(num_timesteps=24)``, saved as a core checkpoint in
    ``folder`` (``model.safetensors`` + ``config.json``); returns the folder."""
    return save_checkpoint(folder, computing_unet(UNET_28).state_dict(), UNET_28, DiffusionConfig(num_timesteps=24))


def latest_run(client: MlflowClient, experiment_name: str):
    """The most recently started run of the experiment ``experiment_name``."""
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
