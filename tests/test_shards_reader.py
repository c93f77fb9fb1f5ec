"""The shard readers: validated against the manifest, clear ShardError on anything incomplete or
incompatible. Outputs are made once by the real job (IDX, Fashion-MNIST) and then damaged in copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _preprocess_helpers import assert_on_grid

from pipelines.data import storage
from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.data.shards.commit import publish
from pipelines.data.shards.manifest import META_SCHEMA_VERSION, SCHEMA_VERSION, Manifest, ShardError
from pipelines.data.shards.reader import load_manifest, read_split, read_split_numpy

LIMIT = 300


@pytest.fixture(scope="module")
def output(ray_local, fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reader") / "shards"
    run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(root), limit=LIMIT, val_fraction=0.25))
    return root


@pytest.fixture
def damaged(output: Path, tmp_path: Path) -> Path:
    """A private copy of the output that a test may break."""
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    return copy


def _edit_manifest(root: Path, **changes) -> None:
    data = json.loads((root / "manifest.json").read_text())
    data.update(changes)
    (root / "manifest.json").write_text(json.dumps(data))


def test_numpy_reader_returns_manifest_counts_shapes_and_grid_values(output: Path):
    manifest = load_manifest(str(output))
    assert manifest.schema_version == SCHEMA_VERSION and manifest.image_shape == (1, 28, 28)
    total = 0
    for split in ("train", "val"):
        images, labels = read_split_numpy(str(output), split)
        assert images.shape == (manifest.counts[split], 1, 28, 28)
        assert labels.dtype == np.int64 and labels.shape == (manifest.counts[split],)
        assert set(labels.tolist()) <= set(range(10))
        assert_on_grid(images)
        total += len(images)
    assert total == LIMIT == manifest.counts["test"]  # --limit per split: 300 train (+ val) and 300 test
    assert 0.15 < manifest.counts["val"] / LIMIT < 0.35


def test_numpy_reader_limit_returns_the_first_rows(output: Path):
    images, labels = read_split_numpy(str(output), "train")
    first, first_labels = read_split_numpy(str(output), "train", limit=7)
    np.testing.assert_array_equal(first, images[:7])
    np.testing.assert_array_equal(first_labels, labels[:7])
    assert read_split_numpy(str(output), "train", limit=0)[0].shape == (0, 1, 28, 28)


def test_ray_reader_holds_the_same_rows_as_the_numpy_reader(output: Path):
    images, labels = read_split_numpy(str(output), "train")
    dataset = read_split(str(output), "train")
    assert dataset.count() == len(images)
    batch = dataset.take_batch(batch_size=len(images), batch_format="numpy")
    assert batch["image"].shape == images.shape and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int64

    def rows(imgs, labs):  # order-free comparison: Ray may interleave files
        return sorted(zip((i.tobytes() for i in imgs), labs.tolist()))

    assert rows(batch["image"], batch["label"]) == rows(images, labels)


def test_manifest_round_trips_through_dict(output: Path):
    manifest = load_manifest(str(output))
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest
    assert sum(s.rows for s in manifest.shards["train"]) == manifest.counts["train"]


def test_missing_manifest_is_refused_as_incomplete(damaged: Path):
    (damaged / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        read_split_numpy(str(damaged), "train")
    with pytest.raises(ShardError, match="not a completed"):
        read_split(str(damaged), "val")


def test_incompatible_manifest_schema_version_is_refused(damaged: Path):
    _edit_manifest(damaged, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(ShardError, match="incompatible shard schema version"):
        load_manifest(str(damaged))


def test_shard_from_another_schema_version_is_refused(damaged: Path):
    manifest = load_manifest(str(damaged))
    shard = damaged / manifest.shards["val"][0].path
    table = pq.read_table(shard)
    metadata = dict(table.schema.metadata)
    metadata[META_SCHEMA_VERSION] = b"0"
    pq.write_table(table.replace_schema_metadata(metadata), shard)
    read_split_numpy(str(damaged), "train")  # the other split is untouched
    with pytest.raises(ShardError, match="schema version '0'"):
        read_split_numpy(str(damaged), "val")


def test_shape_mismatch_between_manifest_and_shards_is_refused(damaged: Path):
    _edit_manifest(damaged, image_shape=[1, 32, 32])
    with pytest.raises(ShardError, match=r"shape \[1, 28, 28\].*\[1, 32, 32\]"):
        read_split_numpy(str(damaged), "train")
    with pytest.raises(ShardError, match="shape"):
        read_split(str(damaged), "train")


def test_count_mismatch_and_missing_shard_are_refused(damaged: Path):
    manifest = load_manifest(str(damaged))
    _edit_manifest(damaged, counts={**manifest.counts, "train": manifest.counts["train"] + 1})
    with pytest.raises(ShardError, match="counts"):
        read_split_numpy(str(damaged), "train")
    _edit_manifest(damaged, counts=manifest.counts)
    (damaged / manifest.shards["train"][-1].path).unlink()
    with pytest.raises(ShardError, match="missing or unreadable"):
        read_split_numpy(str(damaged), "train")


def test_unreadable_manifest_and_unknown_split(damaged: Path):
    with pytest.raises(ValueError, match="split must be one of"):
        read_split_numpy(str(damaged), "holdout")
    (damaged / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        load_manifest(str(damaged))


def test_publish_replaces_old_output_and_drops_unlisted_files(output: Path, tmp_path: Path):
    final = tmp_path / "final"
    shutil.copytree(output, final)
    (final / "stale.txt").write_text("from an older run")
    staging = tmp_path / "staging"
    shutil.copytree(output, staging)
    (staging / "manifest.json").unlink()
    orphan = staging / "train" / "part-999999-deadbeef.parquet"  # e.g. left by a retried task
    shutil.copy(staging / load_manifest(str(output)).shards["train"][0].path, orphan)
    publish(storage.resolve(str(staging)), storage.resolve(str(final)), load_manifest(str(output)))
    assert not staging.exists()
    assert not (final / "stale.txt").exists() and not (final / "train" / orphan.name).exists()
    assert list(tmp_path.glob("final.old-*")) == []
    np.testing.assert_array_equal(read_split_numpy(str(final), "val")[0], read_split_numpy(str(output), "val")[0])


def test_empty_val_split_reads_as_empty(ray_local, fashion_mnist_dir: Path, tmp_path: Path):
    root = tmp_path / "no-val"
    manifest = run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(root), limit=40, val_fraction=0.0))
    assert manifest.counts == {"train": 40, "val": 0, "test": 40}  # --limit per split of the source
    images, labels = read_split_numpy(str(root), "val")
    assert images.shape == (0, 1, 28, 28) and labels.shape == (0,)
    assert read_split(str(root), "val").count() == 0
