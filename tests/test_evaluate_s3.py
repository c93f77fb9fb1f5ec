"""The evaluation paths on shards in S3 (moto's S3 server on loopback, ``tooling.s3_server``): the
whole test split scored from ``s3://`` (``--split test --images all``) with the same figures as
from the same shards on disk, the FD reference statistics of S3 shards cached and then reused for
the local copy (the key is the shards' content, not their location), and ``train_classifier`` on
S3 shards."""

from __future__ import annotations

from pathlib import Path

import pytest
from _eval_helpers import latest_run, save_computing_checkpoint
from _inception_standin import save_stand_in
from mlflow import MlflowClient

from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.evaluate import main as evaluate_main
from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.train_classifier import main as train_classifier_main
from tooling.s3_server import S3Server, s3_server_fixture

pytestmark = pytest.mark.slow
BUCKET = "ddpm-eval"
EXPERIMENT = "ddpm-eval-s3-test"
COMMON = ["--samples", "0", "--threads", "1", "--seed", "3", "--experiment", EXPERIMENT, "--no-compile"]
s3 = s3_server_fixture(scope="module")


@pytest.fixture(scope="module")
def shards(ray_local, s3: S3Server, fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The first 12 train images (train + val) and 12 t10k images (test), on disk and uploaded to S3."""
    local = tmp_path_factory.mktemp("s3-eval") / "shards"
    manifest = run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(local), limit=12,
                                               val_fraction=0.3))
    assert manifest.counts["test"] == 12 and manifest.counts["val"] >= 3
    s3.create_bucket(BUCKET)
    return {"local": local, "s3": s3.upload_folder(local, BUCKET, "shards/fmnist"), "counts": manifest.counts}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("s3-eval") / "checkpoint"
    return save_computing_checkpoint(folder)


def test_whole_test_split_from_s3_scores_as_from_disk(train_sandbox, shards: dict, checkpoint: Path, capsys) -> None:
    client = MlflowClient(resolve_tracking_uri())
    argv = ["--model", str(checkpoint), "--split", "test", "--images", "all", "--estimate", "2", "--batch-size", "6",
            *COMMON]
    assert evaluate_main([*argv, "--shards", shards["s3"]]) == 0, capsys.readouterr().err
    from_s3 = latest_run(client, EXPERIMENT)
    assert evaluate_main([*argv, "--shards", str(shards["local"])]) == 0, capsys.readouterr().err
    from_disk = latest_run(client, EXPERIMENT)
    assert from_s3.data.tags["eval.shards"] == shards["s3"] and from_s3.data.tags["eval.images"] == "12"
    assert from_disk.data.tags["eval.images"] == "12"
    assert from_s3.data.metrics == from_disk.data.metrics  # same images, seeds and process: the same numbers


def test_fd_statistics_of_s3_shards_are_cached_and_reused(train_sandbox, shards: dict, checkpoint: Path,
                                                         tmp_path: Path, capsys) -> None:
    client = MlflowClient(resolve_tracking_uri())
    weights = save_stand_in(tmp_path / "inception.pt", dim=16)
    argv = ["--model", str(checkpoint), "--images", "1", "--estimate", "2", "--sample-steps", "2", *COMMON,
            "--fd", "3", "--fd-features", "inception", "--inception-weights", str(weights),
            "--fd-cache", str(tmp_path / "cache"), "--fd-workers", "1", "--fd-block", "3"]
    assert evaluate_main([*argv, "--shards", shards["s3"]]) == 0, capsys.readouterr().err
    first = latest_run(client, EXPERIMENT)
    assert first.data.tags["fd.reference_cache_hit"] == "false"
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # reference (train) + floor (val[:3])
    assert evaluate_main([*argv, "--shards", str(shards["local"])]) == 0, capsys.readouterr().err
    second = latest_run(client, EXPERIMENT)
    assert second.data.tags["fd.reference_cache_hit"] == "true"
    assert second.data.metrics["fd_floor"] == first.data.metrics["fd_floor"]
    assert second.data.metrics["fd"] == first.data.metrics["fd"]  # same seed, same samples, same statistics
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_train_classifier_reads_s3_shards(shards: dict, tmp_path: Path, capsys) -> None:
    output = tmp_path / "classifier"
    assert train_classifier_main(["--shards", shards["s3"], "--epochs", "1", "--output", str(output), "--no-mlflow",
                                  "--threads", "1", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy:" in printed and str(output) in printed
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
