"""The source's own splits: IDX t10k -> test, a train/ test/ (val/) folder tree, and the manifest's
``splits``; val is carved from train only, never from test (CIFAR-10's batches:
``test_preprocess_cifar.py``)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _preprocess_helpers import is_val, read_idx, write_fashion_folder

from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.data.shards.manifest import SCHEMA_VERSION, Manifest
from pipelines.data.shards.reader import load_manifest, read_split, read_split_numpy
from pipelines.preprocess import format_summary

SEED, VAL = 5, 0.3


def _decode_t10k(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The t10k files decoded independently: gzip + frombuffer at the IDX data offsets 16 / 8."""
    images = np.frombuffer(gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes()), np.uint8, offset=16)
    labels = np.frombuffer(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels


def _to_float(pixels: np.ndarray) -> np.ndarray:
    """k / 127.5 - 1 in float32, written out here rather than taken from the code under test."""
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)


def test_t10k_file_becomes_exactly_the_10000_test_images(ray_local, fashion_mnist_dir: Path, tmp_path: Path):
    source = fashion_mnist_dir / "t10k-images-idx3-ubyte.gz"
    manifest = run_preprocess(PreprocessConfig(input=str(source), output=str(tmp_path / "t10k")))
    assert manifest.schema_version == SCHEMA_VERSION == 2
    assert manifest.counts == {"train": 0, "val": 0, "test": 10000} and manifest.rejected == ()
    assert manifest.splits == {"test": {"rule": "source", "sources": [str(source.resolve())]}}
    pixels, labels = _decode_t10k(fashion_mnist_dir)
    assert len(pixels) == 10000
    images, got_labels = read_split_numpy(str(tmp_path / "t10k"), "test")
    np.testing.assert_array_equal(images, _to_float(pixels)[:, None])  # pixel for pixel, in order
    np.testing.assert_array_equal(got_labels, labels.astype(np.int64))
    assert read_split_numpy(str(tmp_path / "t10k"), "train")[0].shape == (0, 1, 28, 28)
    assert "test: 10000" in format_summary(manifest, str(tmp_path / "t10k"), 1.0)


def test_idx_folder_keeps_test_and_carves_val_from_train_only(ray_local, fashion_mnist_dir: Path, tmp_path: Path):
    limit = 400  # per split of the source: the first 400 t10k and the first 400 train images
    manifest = run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(tmp_path / "out"),
                                               limit=limit, seed=SEED, val_fraction=VAL))
    assert manifest.counts["test"] == limit and manifest.counts["train"] + manifest.counts["val"] == limit
    root = fashion_mnist_dir.resolve()
    assert manifest.splits == {
        "train": {"rule": "source", "sources": [str(root / "train-images-idx3-ubyte.gz")]},
        "val": {"rule": "hash", "from": "train", "fraction": VAL, "seed": SEED},
        "test": {"rule": "source", "sources": [str(root / "t10k-images-idx3-ubyte.gz")]},
    }
    train_pixels = read_idx(fashion_mnist_dir / "train-images-idx3-ubyte.gz")[:limit]
    train_labels = read_idx(fashion_mnist_dir / "train-labels-idx1-ubyte.gz")[:limit]
    val = np.array([is_val(f"train-images-idx3-ubyte:{i}", SEED, VAL) for i in range(limit)])
    for split, mask in (("train", ~val), ("val", val)):
        images, labels = read_split_numpy(str(tmp_path / "out"), split)
        np.testing.assert_array_equal(images, _to_float(train_pixels[mask])[:, None])
        np.testing.assert_array_equal(labels, train_labels[mask])
    pixels, labels = _decode_t10k(fashion_mnist_dir)
    images, got_labels = read_split_numpy(str(tmp_path / "out"), "test")
    np.testing.assert_array_equal(images, _to_float(pixels[:limit])[:, None])  # no t10k image went to val
    np.testing.assert_array_equal(got_labels, labels[:limit])
    again = Manifest.from_dict(json.loads((tmp_path / "out" / "manifest.json").read_text()))
    assert again == manifest and read_split(str(tmp_path / "out"), "test").count() == limit


# ----------------------------------------------------------------------------- folder trees


def _tree(fashion_mnist_dir: Path, root: Path, splits: dict[str, slice]) -> dict[str, dict]:
    images = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")
    return {split: write_fashion_folder(root / split, images[cut], labels[cut], jpeg_every=0) for split, cut in splits.items()}


def _check_tree_split(output: Path, written: dict, split: str, names: list[str], classes: list[str]):
    images, labels = read_split_numpy(str(output), split)
    assert len(images) == len(names)
    np.testing.assert_array_equal(images, np.stack([_to_float(written[n][0])[None] for n in names]))
    np.testing.assert_array_equal(labels, [classes.index(written[n][1]) for n in names])


def test_folder_tree_with_train_and_test_keeps_them(ray_local, fashion_mnist_dir: Path, tmp_path: Path):
    written = _tree(fashion_mnist_dir, tmp_path / "tree", {"train": slice(0, 60), "test": slice(60, 90)})
    output = tmp_path / "out"
    manifest = run_preprocess(PreprocessConfig(input=str(tmp_path / "tree"), output=str(output), size=(28, 28),
                                               mode="L", seed=SEED, val_fraction=VAL))
    classes = sorted({name for split in written.values() for _, name, _ in split.values()})
    assert manifest.classes == tuple(classes) and manifest.has_labels  # class folders below the split folders
    assert manifest.counts["test"] == 30 and manifest.counts["train"] + manifest.counts["val"] == 60
    tree = (tmp_path / "tree").resolve()
    assert manifest.splits["test"] == {"rule": "source", "sources": [str(tree / "test")]}
    assert manifest.splits["train"] == {"rule": "source", "sources": [str(tree / "train")]}
    assert manifest.splits["val"] == {"rule": "hash", "from": "train", "fraction": VAL, "seed": SEED}
    train_names = sorted(f"train/{n}" for n in written["train"])
    flat = {f"{split}/{n}": v for split, files in written.items() for n, v in files.items()}
    _check_tree_split(output, flat, "test", sorted(f"test/{n}" for n in written["test"]), classes)
    _check_tree_split(output, flat, "val", [n for n in train_names if is_val(n, SEED, VAL)], classes)
    _check_tree_split(output, flat, "train", [n for n in train_names if not is_val(n, SEED, VAL)], classes)


def test_folder_tree_with_its_own_val_uses_it_and_carves_nothing(ray_local, fashion_mnist_dir: Path, tmp_path: Path):
    written = _tree(fashion_mnist_dir, tmp_path / "tree", {"train": slice(0, 20), "val": slice(20, 28), "test": slice(28, 33)})
    (tmp_path / "tree" / "README.txt").write_text("not part of any split")
    manifest = run_preprocess(PreprocessConfig(input=str(tmp_path / "tree"), output=str(tmp_path / "out"), size=(28, 28),
                                               mode="L", val_fraction=0.5, limit=15))
    assert manifest.counts == {"train": 15, "val": 8, "test": 5}  # --limit per split; no val carved from train
    assert manifest.splits["val"] == {"rule": "source", "sources": [str((tmp_path / "tree" / "val").resolve())]}
    assert [r["file"] for r in manifest.rejected] == ["README.txt"]
    classes = list(manifest.classes)
    flat = {f"val/{n}": v for n, v in written["val"].items()}
    _check_tree_split(tmp_path / "out", flat, "val", sorted(flat), classes)


def test_folder_without_split_folders_is_all_train(ray_local, fashion_mnist_dir: Path, tmp_path: Path):
    images = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")[:20]
    write_fashion_folder(tmp_path / "plain" / "test", images[:10], np.zeros(10, int), jpeg_every=0)  # a class named test
    write_fashion_folder(tmp_path / "plain" / "Bag", images[10:], np.zeros(10, int), jpeg_every=0)
    manifest = run_preprocess(PreprocessConfig(input=str(tmp_path / "plain"), output=str(tmp_path / "out"), size=(28, 28),
                                               val_fraction=0.0))
    assert manifest.counts == {"train": 20, "val": 0, "test": 0}
    assert "test" in manifest.classes and set(manifest.splits) == {"train", "val"}
    assert manifest.splits["train"] == {"rule": "source", "sources": [str((tmp_path / "plain").resolve())]}


# ----------------------------------------------------------------------------- old manifests


def test_version_1_manifest_is_still_read(ray_local, fashion_mnist_dir: Path, tmp_path: Path):
    output = tmp_path / "v2"
    run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir / "train-images-idx3-ubyte.gz"), output=str(output), limit=30))
    old = tmp_path / "v1"
    shutil.copytree(output, old)
    data = json.loads((old / "manifest.json").read_text())
    data.update(schema_version=1, counts={k: data["counts"][k] for k in ("train", "val")},
                shards={k: data["shards"][k] for k in ("train", "val")})
    data.pop("splits")
    (old / "manifest.json").write_text(json.dumps(data))
    manifest = load_manifest(str(old))
    assert manifest.counts["test"] == 0 and manifest.counts["train"] + manifest.counts["val"] == 30
    assert manifest.splits["val"] == {"rule": "hash", "from": "train", "fraction": 0.1, "seed": 0}
    np.testing.assert_array_equal(read_split_numpy(str(old), "train")[0], read_split_numpy(str(output), "train")[0])
    assert read_split_numpy(str(old), "test")[0].shape == (0, 1, 28, 28)


@pytest.mark.slow
def test_whole_fashion_mnist_folder(ray_local, fashion_mnist_dir: Path, tmp_path: Path):
    manifest = run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(tmp_path / "full"), seed=SEED))
    assert manifest.counts["test"] == 10000 and manifest.counts["train"] + manifest.counts["val"] == 60000
    pixels, labels = _decode_t10k(fashion_mnist_dir)
    images, got_labels = read_split_numpy(str(tmp_path / "full"), "test")
    np.testing.assert_array_equal(images, _to_float(pixels)[:, None])
    np.testing.assert_array_equal(got_labels, labels)
    val = np.array([is_val(f"train-images-idx3-ubyte:{i}", SEED, 0.1) for i in range(60000)])
    assert manifest.counts["val"] == val.sum()
    train_labels = read_idx(fashion_mnist_dir / "train-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(read_split_numpy(str(tmp_path / "full"), "val")[1], train_labels[val])
    assert manifest.classes == ()  # IDX labels are numbers: no class names
