"""Who reads which split: a training job reads "train" and "val" only, never "test";
``pipelines/evaluate.py --split val|test`` scores either, and refuses shards without that split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _train_helpers import tiny_config
from _unet_helpers import computing_unet
from mlflow import MlflowClient

from diffusion_core.checkpoint import load_checkpoint, save_checkpoint
from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.unet import UNet
from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.data.shards import reader
from pipelines.data.shards.reader import read_split_numpy
from pipelines.evaluate import main
from pipelines.evaluation.blocks import block_seed
from pipelines.evaluation.job import EvalSettings
from pipelines.evaluation.metrics import bound_blocks, summarize_estimate
from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.training import batches, launcher
from pipelines.training.splits import TRAINING_SPLITS, training_split

EXPERIMENT = "ddpm-splits-test"


@pytest.fixture(scope="module")
def split_shards(ray_local, fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 12 train images (train + val) and the first 12 t10k images (test)."""
    output = tmp_path_factory.mktemp("split-shards") / "shards"
    manifest = run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(output), limit=12, val_fraction=0.3))
    assert manifest.counts["test"] == 12 and manifest.counts["val"] >= 3
    return output


def test_a_training_job_never_reads_test(split_shards: Path, tmp_path: Path, monkeypatch) -> None:
    read: list[str] = []
    real = reader._validated_shards

    def recording(root: str, split: str):
        read.append(split)
        return real(root, split)

    monkeypatch.setattr(reader, "_validated_shards", recording)  # every reader of every split goes through it
    config = tiny_config(split_shards, tmp_path / "runs", "splits")
    trainer = launcher.build_trainer(config, {})
    assert set(trainer.datasets) == {"train"}
    assert len(batches.load_val_images(config)) == reader.load_manifest(str(split_shards)).counts["val"]  # all (< 8) of val
    assert read == ["train", "val"] and set(read) <= set(TRAINING_SPLITS)
    with pytest.raises(ValueError, match="never 'test'"):
        training_split("test")


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained checkpoint (24 timesteps: the exact bound is 24 forward passes) holding
    ``computing_unet`` weights, so that the Ray actors' figures are compared with this process's
    on a network whose output depends on its input."""
    unet = UNetConfig(image_size=28, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,),
                      num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_groups=4)
    folder = tmp_path_factory.mktemp("untrained") / "checkpoint"
    save_checkpoint(folder, computing_unet(unet, seed=0).state_dict(), unet, DiffusionConfig(num_timesteps=24))
    return folder


def _block_generator() -> torch.Generator:
    """The generator of the bound's first block (``metrics.bound_blocks``) with ``--seed 3``."""
    return torch.Generator().manual_seed(block_seed(3, 0))


def _run_of(client: MlflowClient, split: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`eval.split` = '{split}'")
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_evaluate_scores_the_chosen_split(train_sandbox, split_shards: Path, untrained: Path, capsys) -> None:
    common = ["--model", str(untrained), "--shards", str(split_shards), "--images", "3", "--samples", "0",
              "--threads", "1", "--seed", "3", "--experiment", EXPERIMENT, "--no-compile"]
    assert main([*common, "--split", "test"]) == 0, capsys.readouterr().err
    assert main(common) == 0, capsys.readouterr().err  # default: val, as before
    client = MlflowClient(resolve_tracking_uri())
    loaded = load_checkpoint(untrained)
    for split in ("test", "val"):
        run = _run_of(client, split)
        assert run.data.params["eval.split"] == split
        images = torch.from_numpy(read_split_numpy(str(split_shards), split, limit=3)[0])
        with torch.no_grad():
            expected = loaded.diffusion.calc_bpd_loop(loaded.model, images, generator=_block_generator())
        assert run.data.metrics["eval_bpd"] == pytest.approx(float(expected["total_bpd"].double().mean()), rel=1e-6)
    assert _run_of(client, "test").data.metrics["eval_bpd"] != _run_of(client, "val").data.metrics["eval_bpd"]


@pytest.mark.slow
def test_evaluate_refuses_shards_without_the_split(train_sandbox, ray_local, fashion_mnist_dir: Path, untrained: Path,
                                                   tmp_path: Path, capsys) -> None:
    no_test = tmp_path / "no-test"
    run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir / "train-images-idx3-ubyte.gz"), output=str(no_test), limit=8))
    assert main(["--model", str(untrained), "--shards", str(no_test), "--split", "test", "--samples", "0"]) == 2
    assert "has no test split" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(untrained), "--shards", str(no_test), "--split", "train"])
    with pytest.raises(ValueError, match="split='train' is not allowed"):
        EvalSettings(model=str(untrained), shards=str(no_test), split="train")


@pytest.mark.slow
def test_evaluate_scores_a_whole_split_over_ray_actors(train_sandbox, ray_local, split_shards: Path, untrained: Path,
                                                       capsys) -> None:
    """--images all --estimate K --exact-images M --workers 4: every test image scored by Ray
    actors, the same figures as one process, the bound split into L_T + sum L_t + L_0. Four actors
    hold every CPU of the session's Ray instance, as 2 do on a 2-CPU node: the work must not need
    a CPU of its own besides them (a read task did, and the job hung)."""
    argv = ["--model", str(untrained), "--shards", str(split_shards), "--split", "test", "--images", "all",
            "--estimate", "4", "--exact-images", "3", "--workers", "4", "--batch-size", "5", "--samples", "0",
            "--threads", "1", "--seed", "3", "--experiment", EXPERIMENT, "--no-compile"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    client = MlflowClient(resolve_tracking_uri())
    experiment = client.get_experiment_by_name(EXPERIMENT)
    run = client.search_runs([experiment.experiment_id], filter_string="params.bound_workers = '4'")[0]
    assert (run.data.tags["eval.images"], run.data.params["exact_images"]) == ("12", "3")  # all 12 test images
    assert run.data.tags["eval.method"] == "estimate K=4 + exact calc_bpd_loop on 3 over 4 Ray actors"
    metrics = run.data.metrics

    loaded = load_checkpoint(untrained)
    images = torch.from_numpy(read_split_numpy(str(split_shards), "test")[0])
    local = summarize_estimate(bound_blocks(loaded.diffusion, loaded.model, images, 4, 3, 5), 24, 4)
    assert metrics["eval_bpd_estimate"] == pytest.approx(local["bpd"], rel=1e-5)
    zero_output = UNet(loaded.unet_config).eval()  # the actors' figures are the checkpoint network's
    zero = summarize_estimate(bound_blocks(loaded.diffusion, zero_output, images, 4, 3, 5), 24, 4)
    assert abs(zero["bpd"] - local["bpd"]) > 1e-3 * local["bpd"]
    assert metrics["eval_bpd_estimate_stderr"] == pytest.approx(local["bpd_stderr"], rel=1e-4)
    parts = [metrics[f"eval_bpd_estimate_{name}"] for name in ("prior", "terms", "decoder")]
    assert sum(parts) == pytest.approx(metrics["eval_bpd_estimate"], rel=1e-5)
    with torch.no_grad():
        exact = loaded.diffusion.calc_bpd_loop(loaded.model, images[:3], generator=_block_generator())
    assert metrics["eval_bpd"] == pytest.approx(float(exact["total_bpd"].double().mean()), rel=1e-5)
    assert metrics["eval_decoder_bpd"] == pytest.approx(float(exact["vb"][:, 0].double().mean()), rel=1e-5)
    assert metrics["eval_prior_bpd"] + metrics["eval_terms_bpd"] + metrics["eval_decoder_bpd"] == pytest.approx(
        metrics["eval_bpd"], rel=1e-5)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/bpd_per_timestep.png", "eval/bpd_per_timestep_estimate.png", "eval/bpd_terms.json"} <= artifacts
    assert f"estimated bound: {metrics['eval_bpd_estimate']:.4f} bits/dim" in printed
    assert f"+ L_0 {metrics['eval_decoder_bpd']:.4f}" in printed


def test_whole_split_flags_are_checked(capsys) -> None:
    common = ["--model", "models:/m/1", "--shards", "data/shards"]
    for extra, message in ((["--exact-images", "2"], "--exact-images M needs --estimate K"),
                           (["--images", "3", "--estimate", "4", "--exact-images", "5"], "is more than --images=3"),
                           (["--images", "some"], "'some' is neither a count >= 1 nor 'all'"),
                           (["--workers", "-1"], "--workers=-1 must be >= 0")):
        with pytest.raises(SystemExit):
            main([*common, *extra])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="exact_images needs estimate"):
        EvalSettings(model="m", shards="s", exact_images=2)
