"""Round trips through a real S3-compatible HTTP server on loopback (moto in server mode): sources
and outputs on ``s3://``, read back with both readers, safe re-runs and failures on S3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _preprocess_helpers import assert_on_grid, is_val, plant_bad_files, read_idx, write_fashion_folder

from diffusion_core.images import uint8_to_float
from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.data.shards.reader import load_manifest, read_split, read_split_numpy
from pipelines.data.transforms import BadImageError
from tooling.s3_server import S3Server, s3_server_fixture

BUCKET, SEED, VAL = "ddpm-data", 5, 0.25
s3 = s3_server_fixture(scope="module")


@pytest.fixture(scope="module")
def sources(s3: S3Server, fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A folder source (60 PNG/JPEG + bad files) and the t10k IDX files, uploaded with boto3."""
    local = tmp_path_factory.mktemp("s3-src") / "images"
    images = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")[:60]
    labels = read_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")[:60]
    good = write_fashion_folder(local, images, labels)
    bad = plant_bad_files(local, images[0])
    s3.create_bucket(BUCKET)
    folder_uri = s3.upload_folder(local, BUCKET, "raw/images")
    client = s3.client()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        client.upload_file(str(fashion_mnist_dir / name), BUCKET, f"raw/fashion/{name}")
    failing = tmp_path_factory.mktemp("s3-src") / "failing"  # only image files: fails inside Ray
    write_fashion_folder(failing, images[:12], labels[:12], jpeg_every=0)
    png = next(failing.rglob("*.png")).read_bytes()
    (failing / "Bag").mkdir(exist_ok=True)
    (failing / "Bag" / "truncated.png").write_bytes(png[: len(png) // 2])
    failing_uri = s3.upload_folder(failing, BUCKET, "raw/failing")
    return {"folder": folder_uri, "good": good, "bad": bad, "idx": f"s3://{BUCKET}/raw/fashion", "failing": failing_uri}


def _keys_are_exactly_the_committed_files(s3: S3Server, prefix: str, manifest) -> None:
    listed = {f"{prefix}/{s.path}" for split in ("train", "val", "test") for s in manifest.shards[split]}
    assert set(s3.list_keys(BUCKET, prefix + "/")) == listed | {f"{prefix}/manifest.json"}
    assert [k for k in s3.list_keys(BUCKET) if ".tmp-" in k] == []


def test_folder_from_s3_to_s3_round_trip(ray_local, s3: S3Server, sources: dict):
    output = f"s3://{BUCKET}/shards/images"
    manifest = run_preprocess(PreprocessConfig(input=sources["folder"], output=output, size=(28, 28), mode="L", seed=SEED, val_fraction=VAL))
    assert manifest.source == sources["folder"]
    assert {r["file"] for r in manifest.rejected} == set(sources["bad"])
    assert manifest.counts["train"] + manifest.counts["val"] == len(sources["good"])
    _keys_are_exactly_the_committed_files(s3, "shards/images", manifest)
    assert load_manifest(output) == manifest

    good = sources["good"]
    names = [n for n in sorted(good) if not is_val(n, SEED, VAL)]
    images, labels = read_split_numpy(output, "train")
    assert_on_grid(images)
    assert len(images) == len(names) == manifest.counts["train"]
    for image, name in zip(images, names):
        if good[name][2]:  # PNG: exact
            np.testing.assert_array_equal(image, uint8_to_float(good[name][0][None]))
    np.testing.assert_array_equal(labels, [manifest.classes.index(good[n][1]) for n in names])

    dataset = read_split(output, "train")
    assert dataset.count() == manifest.counts["train"]
    batch = dataset.take_batch(batch_size=len(images), batch_format="numpy")
    assert sorted(b.tobytes() for b in batch["image"]) == sorted(i.tobytes() for i in images)


def test_idx_from_s3_to_local(ray_local, sources: dict, fashion_mnist_dir: Path, tmp_path: Path):
    output = tmp_path / "fashion"
    manifest = run_preprocess(PreprocessConfig(input=sources["idx"], output=str(output), limit=400, seed=SEED, val_fraction=VAL))
    expected = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")[:400]
    expected_labels = read_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")[:400]
    images, labels = read_split_numpy(str(output), "test")  # t10k is the source's test split: no val carved from it
    assert manifest.counts == {"train": 0, "val": 0, "test": 400}
    assert manifest.splits == {"test": {"rule": "source", "sources": [f"{sources['idx']}/t10k-images-idx3-ubyte.gz"]}}
    np.testing.assert_array_equal(images, uint8_to_float(expected[:, None]))
    np.testing.assert_array_equal(labels, expected_labels)


def test_existing_s3_output_is_refused_and_overwrite_replaces_it(ray_local, s3: S3Server, sources: dict):
    output = f"s3://{BUCKET}/shards/rerun"
    first = run_preprocess(PreprocessConfig(input=sources["idx"], output=output, limit=120, val_fraction=0.5))
    with pytest.raises(FileExistsError, match="already exists"):
        run_preprocess(PreprocessConfig(input=sources["idx"], output=output, limit=60))
    assert load_manifest(output) == first
    second = run_preprocess(PreprocessConfig(input=sources["idx"], output=output, limit=60, val_fraction=0.1, overwrite=True))
    assert second.counts["test"] == 60
    assert load_manifest(output) == second
    _keys_are_exactly_the_committed_files(s3, "shards/rerun", second)
    assert len(read_split_numpy(output, "test")[0]) == second.counts["test"]


def test_on_error_fail_on_s3_leaves_nothing(ray_local, s3: S3Server, sources: dict):
    with pytest.raises(BadImageError, match=r"Bag/truncated\.png.*truncated"):
        run_preprocess(PreprocessConfig(input=sources["failing"], output=f"s3://{BUCKET}/shards/failed", size=(28, 28), on_error="fail"))
    assert s3.list_keys(BUCKET, "shards/failed") == []  # neither the output nor its staging prefix
    with pytest.raises(BadImageError, match=r"notes\.txt"):  # a listing-time rejection
        run_preprocess(PreprocessConfig(input=sources["folder"], output=f"s3://{BUCKET}/shards/failed", size=(28, 28), on_error="fail"))
