"""Data-parallel training on real Ray Train workers (gloo on CPU) on real Fashion-MNIST shards.

The session fixture ``tiny_runs`` trains configs/tiny_cpu.yaml for 4 steps twice, with 2 workers
and with 1, same seed and global batch (66 images = the whole training split, so both runs
see the same images at every step however Ray Data splits them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _train_helpers import EXPERIMENT, REGISTERED_MODEL, checkpoint_states
from mlflow import MlflowClient
from safetensors.torch import load_file

from diffusion_core.checkpoint import load_checkpoint
from pipelines.data.shards.reader import read_split_numpy
from pipelines.evaluation.metrics import estimate_bpd, exact_bpd
from pipelines.registry.model_store import fetch_checkpoint
from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.training.config import TrainConfig

pytestmark = pytest.mark.slow
STEPS = 4


def _losses(run_id: str) -> list[tuple[int, float]]:
    history = MlflowClient(resolve_tracking_uri()).get_metric_history(run_id, "loss")
    return sorted((m.step, m.value) for m in history)


def test_workers_hold_identical_weights_after_every_step(tiny_runs) -> None:
    states = checkpoint_states(tiny_runs[2].outcome["run_folder"])  # one checkpoint per step, all kept
    assert list(states) == list(range(1, STEPS + 1))
    for step, state in states.items():
        rank0, rank1 = state["replicas"]
        assert (rank0["rank"], rank1["rank"]) == (0, 1)
        assert rank0["pid"] != rank1["pid"], "the two replicas must be two processes"
        assert rank0["weights_sha256"] == rank1["weights_sha256"], f"weights of rank 0 and 1 differ after step {step}"
        # each worker saw a different half of the batch: their local losses differ
        assert rank0["local_loss"] != rank1["local_loss"]
    digests = {state["replicas"][0]["weights_sha256"] for state in states.values()}
    assert len(digests) == STEPS, "weights did not change at every step"


def test_two_workers_match_one_worker(tiny_runs) -> None:
    two, one = _losses(tiny_runs[2].outcome["mlflow_run_id"]), _losses(tiny_runs[1].outcome["mlflow_run_id"])
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=1e-5)
    # the loss of the 2-worker run is the mean of its workers' local means (equal halves)
    states = checkpoint_states(tiny_runs[2].outcome["run_folder"])
    local = [sum(r["local_loss"] for r in state["replicas"]) / 2 for state in states.values()]
    np.testing.assert_allclose([v for _, v in two], local, rtol=1e-5)
    # and after 4 Adam steps both runs hold the same weights
    final = [Path(tiny_runs[w].outcome["checkpoint"]) / "raw_model.safetensors" for w in (2, 1)]
    weights_two, weights_one = load_file(str(final[0])), load_file(str(final[1]))
    assert weights_two.keys() == weights_one.keys()
    for key in weights_two:
        torch.testing.assert_close(weights_two[key], weights_one[key], rtol=1e-4, atol=1e-5)


def test_checkpoint_holds_the_full_training_state(tiny_runs) -> None:
    run = tiny_runs[2]
    folder = Path(run.outcome["checkpoint"])
    assert folder.name == f"checkpoint_{STEPS:08d}" and folder.parent == Path(run.outcome["run_folder"])
    state = json.loads((folder / "train_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2
    assert state["mlflow_run_id"] == run.outcome["mlflow_run_id"]
    assert TrainConfig.from_dict(yaml.safe_load((folder / "train_config.yaml").read_text())) == run.config
    loaded = load_checkpoint(folder)  # the EMA weights, as serving loads them
    assert loaded.metadata["step"] == STEPS and loaded.metadata["weights"] == "ema"
    assert loaded.unet_config == run.config.model
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert len(optimizer["rng_states"]) == 2
    optimizer_state = optimizer["optimizer"]["state"]
    assert len(optimizer_state) == len(list(loaded.model.parameters()))  # one Adam state per parameter
    assert all(s["step"] == STEPS for s in optimizer_state.values())
    raw = load_file(str(folder / "raw_model.safetensors"))
    ema_differs = any(not torch.equal(raw[k], v) for k, v in loaded.model.state_dict().items())
    assert ema_differs, "EMA weights should lag behind the raw weights"
    kept = sorted(p.name for p in folder.parent.glob("checkpoint_0*"))
    assert kept == [f"checkpoint_{step:08d}" for step in range(1, STEPS + 1)]  # checkpoint_every 1, all kept


def test_mlflow_run_has_config_metrics_samples_and_model(tiny_runs) -> None:
    run = tiny_runs[2]
    client = MlflowClient(resolve_tracking_uri())
    data = client.get_run(run.outcome["mlflow_run_id"])
    assert client.get_experiment(data.info.experiment_id).name == EXPERIMENT
    assert data.info.status == "FINISHED"
    assert data.data.params == run.config.flat_params()
    for key in ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "grad_norm", "images_per_s",
                "val_bpd", "val_bpd_stderr", "val_bpd_exact"):
        assert key in data.data.metrics, key
    assert any(k.startswith("system/") for k in data.data.metrics), "system metrics missing"
    assert [m.step for m in client.get_metric_history(data.info.run_id, "val_bpd")] == [2, 4]
    # the bounds rank 0 logged, recomputed from the registered EMA model on the same validation images
    # with the same seed: the exact bound and the step-4 estimate (and its standard error) equal them.
    # (Whether the estimate is unbiased is tested at K = 8 in test_bound_blocks.py; here K = 2, one
    # stratum, where one image's L_0 outweighs the rest and 8 images say little.)
    registered = load_checkpoint(fetch_checkpoint(data.data.tags["ddpm.model_uri"]))
    val = torch.from_numpy(read_split_numpy(run.config.data.shards, "val", limit=run.config.train.bpd_images)[0])
    exact = exact_bpd(registered.diffusion, registered.model, val[: run.config.train.final_bpd_images],
                      seed=run.config.train.seed)
    assert data.data.metrics["val_bpd_exact"] == pytest.approx(exact["bpd"], rel=1e-5)
    estimate = estimate_bpd(registered.diffusion, registered.model, val, run.config.train.bpd_samples,
                            seed=run.config.train.seed)
    assert data.data.metrics["val_bpd"] == pytest.approx(estimate["bpd"], rel=1e-5)
    assert data.data.metrics["val_bpd_stderr"] == pytest.approx(estimate["bpd_stderr"], rel=1e-4)
    assert estimate["bpd_stderr"] > 0
    lrs = sorted((m.step, m.value) for m in client.get_metric_history(data.info.run_id, "lr"))
    assert [v for _, v in lrs] == pytest.approx([1e-3 * s / 20 for s in range(1, STEPS + 1)])  # warm-up
    samples = [a.path for a in client.list_artifacts(data.info.run_id, "samples")]
    assert samples == ["samples/step_00000002.png", "samples/step_00000004.png"]
    manifest = json.loads((Path(run.config.data.shards) / "manifest.json").read_text())
    assert data.data.tags["data.manifest_checksum"] == manifest["source_checksum"]
    assert data.data.tags["data.shards"] == run.config.data.shards
    model_uri = data.data.tags["ddpm.model_uri"]
    assert model_uri.startswith(f"models:/{REGISTERED_MODEL}/")
    version = client.get_model_version(REGISTERED_MODEL, model_uri.rsplit("/", 1)[1])
    assert version.run_id == data.info.run_id
    assert version.tags["data_manifest_checksum"] == manifest["source_checksum"]


def test_fd_logged_during_training_matches_a_recomputation(tiny_runs, fd_classifier_folder: Path) -> None:
    from diffusion_core.generate import SamplerSettings
    from pipelines.evaluation.classifier import ClassifierFeatures, load_classifier
    from pipelines.evaluation.distributed_sampling import num_blocks, sample_blocks
    from pipelines.evaluation.fd import feature_stats, features_in_batches, frechet_distance
    from pipelines.training.fd_monitor import fd_block_size

    client = MlflowClient(resolve_tracking_uri())
    net = ClassifierFeatures(load_classifier(fd_classifier_folder)[0])
    train_images = read_split_numpy(tiny_runs[2].config.data.shards, "train")[0]
    val_images = read_split_numpy(tiny_runs[2].config.data.shards, "val", limit=12)[0]
    reference = feature_stats(features_in_batches(net, train_images))
    floor = frechet_distance(feature_stats(features_in_batches(net, val_images)), reference)
    for workers, run in tiny_runs.items():
        run_id, train = run.outcome["mlflow_run_id"], run.config.train
        fd = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "fd"))
        floors = client.get_metric_history(run_id, "fd_floor")
        assert [s for s, _ in fd] == [2, 4] and all(np.isfinite(v) and v > 0 for _, v in fd), fd
        assert [m.step for m in floors] == [2] and floors[0].value == pytest.approx(floor, rel=1e-6)
        # step 4's FD from the registered EMA model (the weights of step 4), sampled in this process
        registered = load_checkpoint(fetch_checkpoint(client.get_run(run_id).data.tags["ddpm.model_uri"]))
        samples = sample_blocks(registered.diffusion, registered.model, registered.unet_config.image_shape,
                                SamplerSettings(train.sample_sampler, train.sample_steps), train.fd_images,
                                fd_block_size(train.fd_images), train.seed,
                                np.arange(num_blocks(train.fd_images, fd_block_size(train.fd_images))))["image"]
        expected = frechet_distance(feature_stats(features_in_batches(net, samples)), reference)
        assert fd[1][1] == pytest.approx(expected, rel=1e-4), (workers, fd, expected)
