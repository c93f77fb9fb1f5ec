"""Rank 0's duties besides training: buffering and flushing MLflow metrics, sample grids, held-out
bits/dim, the FD lines, and at the end the final model logged and registered
(``pipelines.registry``).

For a class-conditional model (``model.num_classes`` = K) the grids have one row per class (drawn
with classifier-free guidance at ``train.sample_guidance_scale``), and the held-out bound is
measured twice on the same images and noise: ``val_bpd`` / ``val_bpd_exact`` with every label -1
(the bound on -log p(x), comparable with an unconditional model's) and ``val_bpd_cond`` /
``val_bpd_exact_cond`` with the true labels (the bound on -log p(x | y))."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from diffusion_core.checkpoint import save_checkpoint
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.unet import UNet
from pipelines.evaluation.metrics import class_grid_labels, estimate_bpd, exact_bpd, sample_grid
from pipelines.registry.model_store import log_checkpoint_model
from pipelines.registry.runs import MetricBuffer, RunTracker
from pipelines.training.config import TrainConfig
from pipelines.training.fd_monitor import TrainingFD
from pipelines.training.progress import ProgressLog
from pipelines.training.tags import MODEL_STEP_TAG, MODEL_URI_TAG
from pipelines.training.trainee import Trainee


def ema_network(trainee: Trainee, config: TrainConfig, device: torch.device) -> UNet:
    """A fresh UNet in eval mode holding the EMA weights."""
    return trainee.ema.copy_to(UNet(config.model).to(device)).eval()


class ChiefDuties:
    """What rank 0 does besides training: metric buffering/flushing, sample grids, bits/dim.

    Args:
        config: the run's config.
        tracker: the open MLflow run.
        diffusion: the run's diffusion process.
        val_images: the fixed validation subset [N, C, H, W] (``batches.load_val_subset``).
        pending: metrics of the restored checkpoint not yet confirmed in MLflow, ``{step: {key: value}}``.
        start_step: the step this start resumed from (0 for a fresh run).
        progress: the progress printer (default: stdout, ``time.monotonic``).
        val_labels: the subset's labels, int64 [N] (for a class-conditional model's ``*_cond``
            bounds; ``None`` or empty: none).
    """

    def __init__(self, config: TrainConfig, tracker: RunTracker, diffusion: GaussianDiffusion,
                 val_images: torch.Tensor, pending: dict[int, dict[str, float]], start_step: int = 0,
                 progress: ProgressLog | None = None, val_labels: torch.Tensor | None = None) -> None:
        self.config = config
        self.tracker = tracker
        self.diffusion = diffusion
        self.val_images = val_images
        self.val_labels = val_labels if config.model.num_classes is not None and val_labels is not None \
            and len(val_labels) else None
        self.buffer = MetricBuffer()
        self.progress = progress or ProgressLog(config.train.total_steps, start_step)
        tracker.resume_pending(pending)
        self.logged_through = tracker.last_logged_step()
        """The last step whose metrics the run holds when this start begins: a start that resumed from
        an earlier checkpoint re-runs the steps after it, and those already logged are not logged again."""
        self.floor_logged = bool(config.train.fd_every) and tracker.has_metric_any("fd_floor")
        """Whether the run already holds ``fd_floor`` (logged once, also across restarts)."""

    def flush_through(self, step: int) -> None:
        """Log the buffered metrics of the steps through ``step`` (called once that step's checkpoint
        is reported), leaving out the steps the run already holds: Ray Train restarts from the last
        checkpoint its controller registered, which can be one before the last that rank 0 reported
        and flushed when a worker dies in between, so a restart re-runs steps MLflow has; each step is
        logged once."""
        taken = self.buffer.take_through(step)
        self.tracker.log_steps({s: values for s, values in taken.items() if s > self.logged_through})

    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the model."""
        return self.config.model.image_shape

    def periodic(self, trainee: Trainee, device: torch.device) -> None:
        """Sample grid and/or bits/dim estimate when ``trainee.step`` is due."""
        train, step = self.config.train, trainee.step
        samples_due = train.sample_every and step % train.sample_every == 0
        bpd_due = train.bpd_every and step % train.bpd_every == 0 and len(self.val_images)
        if not (samples_due or bpd_due):
            return
        net = ema_network(trainee, self.config, device)
        if samples_due:
            self.log_samples(net, step)
        if bpd_due:
            subset = self.val_images[: train.bpd_images].to(device)
            result = estimate_bpd(self.diffusion, net, subset, train.bpd_samples, seed=train.seed)
            self.buffer.add(step, {"val_bpd": result["bpd"], "val_bpd_stderr": result["bpd_stderr"]})
            self.progress.val_bpd(step, result["bpd"], result["bpd_stderr"], len(subset), train.bpd_samples)
            if self.val_labels is not None:
                cond = estimate_bpd(self.diffusion, net, subset, train.bpd_samples, seed=train.seed,
                                    class_labels=self.val_labels[: train.bpd_images].to(device))
                self.buffer.add(step, {"val_bpd_cond": cond["bpd"], "val_bpd_cond_stderr": cond["bpd_stderr"]})
                self.progress.emit(f"val_bpd_cond at step {step}: {cond['bpd']:.4f} +- {cond['bpd_stderr']:.4f} "
                                   f"bits/dim (true labels; val_bpd above has no label) -> MLflow metric val_bpd_cond")

    def log_samples(self, net: UNet, step: int) -> None:
        """A grid of the EMA model drawn with ``train.sampler_settings`` as ``samples/step_<step>.png``
        (same seed every time). For a class-conditional model of K classes: K rows, row k holding
        ceil(``train.sample_images`` / K) samples of class k, guided at ``train.sample_guidance_scale``."""
        train, num_classes = self.config.train, self.config.model.num_classes
        if num_classes is None:
            _, png = sample_grid(self.diffusion, net, self.image_shape(), train.sample_images,
                                 train.sampler_settings, train.seed)
        else:
            per_class = -(-train.sample_images // num_classes)
            labels = class_grid_labels(range(num_classes), per_class)
            _, png = sample_grid(self.diffusion, net, self.image_shape(), len(labels), train.sampler_settings,
                                 train.seed, class_labels=labels, guidance_scale=train.sample_guidance_scale,
                                 nrow=per_class)
        artifact = f"samples/step_{step:08d}.png"
        self.tracker.log_png(png, artifact)
        self.progress.samples(step, artifact, self.tracker.run_id)

    def finalize(self, trainee: Trainee, device: torch.device, manifest: dict[str, Any]) -> None:
        """At the end (once per final step, also across restarts; a run extended to more steps
        is finalized again): final grid, exact held-out bits/dim, and the EMA model logged and
        registered with the data manifest attached."""
        train, step = self.config.train, trainee.step
        if self.tracker.tag(MODEL_STEP_TAG) == str(step):
            return
        net = ema_network(trainee, self.config, device)
        self.log_samples(net, step)
        if train.final_bpd_images and len(self.val_images) and not self.tracker.has_metric("val_bpd_exact", step):
            subset = self.val_images[: train.final_bpd_images].to(device)
            result = exact_bpd(self.diffusion, net, subset, seed=train.seed)
            metrics = {"val_bpd_exact": result["bpd"], "val_prior_bpd": result["prior_bpd"]}
            if self.val_labels is not None:
                cond = exact_bpd(self.diffusion, net, subset, seed=train.seed,
                                 class_labels=self.val_labels[: train.final_bpd_images].to(device))
                metrics["val_bpd_exact_cond"] = cond["bpd"]
                self.progress.emit(f"val_bpd_exact_cond at step {step}: {cond['bpd']:.4f} bits/dim (true labels) "
                                   "-> MLflow metric val_bpd_exact_cond")
            self.tracker.log_steps({step: metrics})
            self.progress.exact_bpd(step, result["bpd"], len(subset))
        with tempfile.TemporaryDirectory(prefix="ddpm-final-") as folder:
            save_checkpoint(folder, trainee.ema.state_dict(), self.config.model, self.config.diffusion,
                            metadata={"step": step, "weights": "ema", "mlflow_run_id": self.tracker.run_id,
                                      "run_name": train.run_name, **class_names_metadata(self.config, manifest)})
            ref = log_checkpoint_model(folder, registered_model_name=self.config.tracking.registered_model_name,
                                       manifest=manifest)
        self.tracker.set_tags({MODEL_URI_TAG: ref.model_uri, MODEL_STEP_TAG: str(step)})
        self.progress.model(step, ref.model_uri)


def class_names_metadata(config: TrainConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """``{"class_names": [...]}`` (name i = label i) for a class-conditional model whose shards'
    manifest names exactly ``model.num_classes`` classes, for the checkpoint's metadata (Serve and
    the pyfunc resolve class names from it); ``{}`` otherwise."""
    classes = list(manifest.get("classes") or [])
    if config.model.num_classes is None or len(classes) != config.model.num_classes:
        return {}
    return {"class_names": [str(name) for name in classes]}


def measure_fd(fd: TrainingFD, trainee: Trainee, config: TrainConfig, diffusion: GaussianDiffusion,
               device: torch.device, chief: ChiefDuties | None) -> None:
    """The FD of the EMA model at ``trainee.step`` (a collective: every rank calls it); rank 0
    buffers ``fd`` (and ``fd_floor`` the first time in the run) and prints a line."""
    step = trainee.step
    with_floor = chief is not None and not chief.floor_logged
    result = fd.measure(ema_network(trainee, config, device), diffusion, device, with_floor)
    if chief is None or result is None:
        return
    if with_floor:
        chief.floor_logged = True
    chief.buffer.add(step, result)
    chief.progress.fd(step, result["fd"], result.get("fd_floor"), config.train.fd_images)
