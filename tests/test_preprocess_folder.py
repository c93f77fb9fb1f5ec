"""Preprocessing of a folder tree of real images (Fashion-MNIST written as PNG and JPEG in class
folders) with planted corrupt, truncated, empty, wrong-extension and oversized files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _preprocess_helpers import (
    FASHION_CLASSES,
    assert_on_grid,
    is_val,
    leftovers,
    plant_bad_files,
    read_idx,
    write_fashion_folder,
)
from PIL import Image, ImageOps

from diffusion_core.images import uint8_to_float
from pipelines.data import job as preprocess_job
from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.data.shards.reader import load_manifest, read_split_numpy
from pipelines.data.transforms import BadImageError

COUNT, SEED, VAL = 150, 11, 0.3


@pytest.fixture(scope="module")
def folder(fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """(folder, {relpath: (pixels, class, lossless)} of the good files, {relpath: reason word} of the bad ones)."""
    root = tmp_path_factory.mktemp("folder") / "images"
    images = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")[:COUNT]
    labels = read_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")[:COUNT]
    good = write_fashion_folder(root, images, labels)
    bad = plant_bad_files(root, images[0])
    return root, good, bad


@pytest.fixture(scope="module")
def converted(ray_local, folder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("folder-out") / "shards"
    run_preprocess(PreprocessConfig(input=str(folder[0]), output=str(output), size=(28, 28), mode="L", seed=SEED, val_fraction=VAL))
    return output


def test_bad_files_are_listed_with_their_reasons_and_skipped(converted: Path, folder):
    _, good, bad = folder
    manifest = load_manifest(str(converted))
    reasons = {r["file"]: r["reason"] for r in manifest.rejected}
    assert set(reasons) == set(bad)  # the hidden .DS_Store is ignored, not rejected
    for file, word in bad.items():
        assert word in reasons[file], (file, reasons[file])
    assert manifest.counts["train"] + manifest.counts["val"] == len(good) == COUNT


def test_good_files_are_converted_exactly_with_class_labels(converted: Path, folder):
    _, good, _ = folder
    manifest = load_manifest(str(converted))
    classes = sorted({name for _, name, _ in good.values()})
    assert manifest.classes == tuple(classes) and manifest.has_labels
    assert manifest.classes != tuple(FASHION_CLASSES[: len(classes)])  # sorted names, not IDX numbers
    order = sorted(good)  # listing order: sorted relative paths
    for split in ("train", "val"):
        names = [n for n in order if is_val(n, SEED, VAL) == (split == "val")]
        images, labels = read_split_numpy(str(converted), split)
        assert len(images) == len(names) == manifest.counts[split]
        assert_on_grid(images)
        np.testing.assert_array_equal(labels, [classes.index(good[n][1]) for n in names])
        for image, name in zip(images, names):
            source = uint8_to_float(good[name][0][None])
            if good[name][2]:  # PNG: lossless, so exact
                np.testing.assert_array_equal(image, source)
            else:  # JPEG quality 95: close to the source
                assert np.abs(image - source).mean() < 0.05, name


def test_resize_and_rgb_follow_pillow(ray_local, folder, tmp_path: Path):
    root, good, _ = folder
    output = tmp_path / "rgb"
    manifest = run_preprocess(PreprocessConfig(input=str(root), output=str(output), size=(14, 20), mode="RGB", seed=SEED, val_fraction=VAL))
    assert manifest.image_shape == (3, 14, 20)
    images, _ = read_split_numpy(str(output), "train")
    assert images.shape[1:] == (3, 14, 20)
    assert_on_grid(images)
    np.testing.assert_array_equal(images[:, 0], images[:, 2])  # gray sources: R == G == B
    first = next(n for n in sorted(good) if not is_val(n, SEED, VAL))
    expected = ImageOps.fit(Image.open(root / first).convert("RGB"), (20, 14), method=Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(images[0], uint8_to_float(np.asarray(expected).transpose(2, 0, 1)))


def test_pixel_limit_is_configurable(ray_local, folder, tmp_path: Path):
    root, _, _ = folder
    with pytest.raises(ValueError, match="none of the .* items could be converted.*too many pixels"):
        run_preprocess(PreprocessConfig(input=str(root), output=str(tmp_path / "tiny"), size=(28, 28), max_pixels=500))
    assert not (tmp_path / "tiny").exists() and leftovers(tmp_path / "tiny") == []


def test_on_error_fail_names_the_file_and_leaves_no_output(ray_local, fashion_mnist_dir: Path, tmp_path: Path):
    source = tmp_path / "src"
    images = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")[:24]
    write_fashion_folder(source, images, np.arange(24) % 2, jpeg_every=0)
    truncated = (source / "Trouser" / "item0001.png").read_bytes()
    (source / "Trouser" / "item0009.png").write_bytes(truncated[: len(truncated) // 2])
    output = tmp_path / "out"
    with pytest.raises(BadImageError, match=r"Trouser/item0009\.png.*truncated") as caught:
        run_preprocess(PreprocessConfig(input=str(source), output=str(output), size=(28, 28), on_error="fail"))
    assert caught.value.file == "Trouser/item0009.png"
    assert not output.exists() and leftovers(output) == []


def test_on_error_fail_stops_at_listing_for_a_non_image_extension(folder, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(preprocess_job, "ray_session", lambda: pytest.fail("Ray work started"))
    with pytest.raises(BadImageError, match=r"notes\.txt.*unsupported file extension"):
        run_preprocess(PreprocessConfig(input=str(folder[0]), output=str(tmp_path / "out"), size=(28, 28), on_error="fail"))
    assert not (tmp_path / "out").exists()


def test_folder_source_needs_a_size(folder, tmp_path: Path):
    with pytest.raises(ValueError, match="--size H W is required"):
        run_preprocess(PreprocessConfig(input=str(folder[0]), output=str(tmp_path / "out")))
