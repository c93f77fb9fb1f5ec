"""The command-line flags of ``python pipelines/preprocess.py`` (``--val-fraction``, ``--overwrite``,
``--class-names``, ``--on-error``, ``--max-pixels``, ``--resample``), each driven through the real entry point
(``preprocess.main(argv)``, on the tests' Ray instance) on real files, checked on what the run
wrote: manifest.json, shard rows and pixel values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _preprocess_helpers import (
    corrupt_png,
    is_val,
    leftovers,
    png_bytes,
    read_idx,
    run_cli,
    to_unit,
    tree_snapshot,
)
from PIL import Image

from pipelines.data.shards.reader import load_manifest, read_split_numpy

TRAIN_IDX = "train-images-idx3-ubyte"  # a train file: all of it is train + carved val


def _split_of(images: np.ndarray, seed: int, val_fraction: float) -> dict[str, np.ndarray]:
    """The first len(images) training images per split, by the documented hash rule."""
    val = np.array([is_val(f"{TRAIN_IDX}:{i}", seed, val_fraction) for i in range(len(images))])
    return {"train": images[~val], "val": images[val]}


# ----------------------------------------------------------------------------- --val-fraction


@pytest.mark.parametrize("val_fraction", [0.5, 0.1])
def test_val_fraction_flag_splits_by_the_documented_hash_rule(ray_local, fashion_mnist_dir: Path, tmp_path: Path, capsys, val_fraction):
    limit, seed = 400, 5
    source = fashion_mnist_dir / f"{TRAIN_IDX}.gz"
    code, out, err = run_cli(capsys, "--input", source, "--output", tmp_path / "out", "--limit", limit,
                             "--seed", seed, "--val-fraction", val_fraction)
    assert code == 0, err
    expected = _split_of(read_idx(source)[:limit], seed, val_fraction)
    manifest = load_manifest(str(tmp_path / "out"))
    assert manifest.counts == {"train": len(expected["train"]), "val": len(expected["val"]), "test": 0}
    assert manifest.counts["train"] + manifest.counts["val"] == limit
    assert manifest.options["val_fraction"] == val_fraction and manifest.options["seed"] == seed
    # the share follows the flag (400 items: 0.1 -> ~40, 0.5 -> ~200), not the default 0.1 alone
    assert abs(manifest.counts["val"] - val_fraction * limit) < 0.1 * limit
    assert f"train: {manifest.counts['train']}  val: {manifest.counts['val']}" in out
    for split in ("train", "val"):  # the very items the rule names, in listing order
        images, _ = read_split_numpy(str(tmp_path / "out"), split)
        np.testing.assert_array_equal(images, to_unit(expected[split][:, None]))


def test_val_fraction_outside_its_range_is_refused_before_any_work(fashion_mnist_dir: Path, tmp_path: Path, capsys):
    for bad in ("1.0", "-0.1"):
        code, _, err = run_cli(capsys, "--input", fashion_mnist_dir / f"{TRAIN_IDX}.gz", "--output", tmp_path / "out",
                               "--val-fraction", bad)
        assert code == 1 and "val_fraction must be in [0, 1)" in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


# ----------------------------------------------------------------------------- --overwrite


def test_overwrite_flag_refuses_without_and_replaces_with(ray_local, fashion_mnist_dir: Path, tmp_path: Path, capsys):
    source, output = fashion_mnist_dir / f"{TRAIN_IDX}.gz", tmp_path / "out"
    code, _, err = run_cli(capsys, "--input", source, "--output", output, "--limit", 120, "--val-fraction", 0.25)
    assert code == 0, err
    before = tree_snapshot(output)
    assert "manifest.json" in before

    code, out, err = run_cli(capsys, "--input", source, "--output", output, "--limit", 60)
    assert code == 1
    assert "already exists" in err and "--overwrite" in err and str(output.resolve()) in err, err
    assert tree_snapshot(output) == before  # manifest and every shard byte for byte
    assert leftovers(output) == []

    code, _, err = run_cli(capsys, "--input", source, "--output", output, "--limit", 60, "--overwrite")
    assert code == 0, err
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["options"]["limit"] == 60 and manifest["options"]["val_fraction"] == 0.1
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 60
    assert "--overwrite" in manifest["command"]
    listed = {s["path"] for split in ("train", "val") for s in manifest["shards"][split]}
    on_disk = {str(p.relative_to(output)) for p in output.rglob("*.parquet")}
    assert on_disk == listed  # nothing left of the first run's shards
    expected = _split_of(read_idx(source)[:60], 0, 0.1)
    for split in ("train", "val"):
        images, _ = read_split_numpy(str(output), split)
        np.testing.assert_array_equal(images, to_unit(expected[split][:, None]))
    assert leftovers(output) == []


# ----------------------------------------------------------------------------- --class-names

FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot")


def test_class_names_flag_names_idx_labels_in_the_manifest(ray_local, fashion_mnist_dir: Path, tmp_path: Path, capsys):
    output = tmp_path / "out"
    code, _, err = run_cli(capsys, "--input", fashion_mnist_dir, "--output", output, "--limit", 40,
                           "--class-names", *FASHION_NAMES)
    assert code == 0, err
    manifest = load_manifest(str(output))
    assert manifest.classes == FASHION_NAMES and manifest.has_labels
    _, labels = read_split_numpy(str(output), "test")
    assert labels.min() >= 0 and labels.max() < len(FASHION_NAMES)


def test_class_names_flag_is_refused_for_repeated_names_and_unlabelled_sources(
        ray_local, fashion_mnist_dir: Path, tmp_path: Path, capsys):
    code, _, err = run_cli(capsys, "--input", fashion_mnist_dir, "--output", tmp_path / "a", "--class-names", "Bag", "Bag")
    assert code == 1 and "class_names must be distinct" in err, err
    unlabelled = tmp_path / "images-only"
    unlabelled.mkdir()
    (unlabelled / f"{TRAIN_IDX}.gz").write_bytes((fashion_mnist_dir / f"{TRAIN_IDX}.gz").read_bytes())
    code, _, err = run_cli(capsys, "--input", unlabelled, "--output", tmp_path / "b", "--limit", 10,
                           "--class-names", *FASHION_NAMES)
    assert code == 1 and "has no labels" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- --on-error


@pytest.fixture(scope="module")
def folder_with_corrupt_file(fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Six real Fashion-MNIST PNGs and, in the middle of the listing, one with scrambled pixel data."""
    root = tmp_path_factory.mktemp("on-error") / "src"
    root.mkdir()
    images = read_idx(fashion_mnist_dir / f"{TRAIN_IDX}.gz")[:7]
    good = {}
    for i, pixels in enumerate(images):
        name = f"item{i}.png"
        if i == 3:
            (root / name).write_bytes(corrupt_png(png_bytes(pixels)))
        else:
            (root / name).write_bytes(png_bytes(pixels))
            good[name] = pixels
    return root, good


def test_on_error_skip_lists_the_corrupt_file_and_writes_the_good_ones(ray_local, folder_with_corrupt_file, tmp_path: Path, capsys):
    root, good = folder_with_corrupt_file
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, "--input", root, "--output", output, "--size", 28, 28, "--mode", "L",
                             "--val-fraction", 0, "--on-error", "skip")
    assert code == 0, err
    manifest = json.loads((output / "manifest.json").read_text())
    assert [r["file"] for r in manifest["rejected"]] == ["item3.png"]
    assert "corrupt" in manifest["rejected"][0]["reason"], manifest["rejected"]
    assert manifest["options"]["on_error"] == "skip"
    assert manifest["counts"] == {"train": len(good), "val": 0, "test": 0}
    assert "rejected: 1" in out and "rejected item3.png: corrupt" in out
    images, labels = read_split_numpy(str(output), "train")
    np.testing.assert_array_equal(images, to_unit(np.stack([good[n] for n in sorted(good)])[:, None]))
    np.testing.assert_array_equal(labels, -1)  # files directly in the folder carry no label


def test_on_error_fail_exits_non_zero_naming_the_file_and_leaves_no_output(ray_local, folder_with_corrupt_file, tmp_path: Path, capsys):
    root, _ = folder_with_corrupt_file
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, "--input", root, "--output", output, "--size", 28, 28, "--mode", "L",
                             "--val-fraction", 0, "--on-error", "fail")
    assert code == 1
    assert "item3.png" in err and "corrupt" in err, err
    assert "output:" not in out
    assert not output.exists() and leftovers(output) == []


# ----------------------------------------------------------------------------- --max-pixels


def test_max_pixels_flag_rejects_only_the_images_over_the_limit(ray_local, tmp_path: Path, capsys):
    rng = np.random.default_rng(3)
    root = tmp_path / "src"
    root.mkdir()
    small = rng.integers(0, 256, (8, 8), dtype=np.uint8)  # 64 pixels
    edge = rng.integers(0, 256, (10, 10), dtype=np.uint8)  # 100 pixels: at the limit, accepted
    big = rng.integers(0, 256, (10, 11), dtype=np.uint8)  # 110 pixels: over it
    for name, pixels in (("a_small.png", small), ("b_edge.png", edge), ("c_big.png", big)):
        (root / name).write_bytes(png_bytes(pixels))
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, "--input", root, "--output", output, "--size", 8, 8, "--mode", "L",
                             "--val-fraction", 0, "--max-pixels", 100)
    assert code == 0, err
    manifest = load_manifest(str(output))
    assert [r["file"] for r in manifest.rejected] == ["c_big.png"]
    assert "too many pixels: 11x10 = 110 > max_pixels 100" in manifest.rejected[0]["reason"]
    assert manifest.options["max_pixels"] == 100 and manifest.counts == {"train": 2, "val": 0, "test": 0}
    images, _ = read_split_numpy(str(output), "train")
    np.testing.assert_array_equal(images[0, 0], to_unit(small))  # already 8 x 8: exact
    resized = Image.fromarray(edge).resize((8, 8), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(images[1, 0], to_unit(np.asarray(resized)))


# ----------------------------------------------------------------------------- --resample

FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
#: A 24 x 16 (W x H) RGB noise image resized to 9 x 6: same aspect ratio, so the center crop keeps
#: everything and the output is exactly Pillow's ``resize`` with the filter.
SOURCE_WH, TARGET_WH = (24, 16), (9, 6)


@pytest.fixture(scope="module")
def noise_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Image.Image]:
    root = tmp_path_factory.mktemp("resample") / "src"
    root.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (SOURCE_WH[1], SOURCE_WH[0], 3), dtype=np.uint8)
    (root / "noise.png").write_bytes(png_bytes(pixels))
    return root, Image.fromarray(pixels, mode="RGB")


@pytest.mark.parametrize("resample", [*FILTERS, None])
def test_resample_flag_uses_that_pillow_filter(ray_local, noise_image, tmp_path: Path, capsys, resample):
    root, image = noise_image
    expected = {name: np.asarray(image.resize(TARGET_WH, f)).transpose(2, 0, 1) for name, f in FILTERS.items()}
    name = resample or "bicubic"  # the documented default
    others = [other for other in FILTERS if np.array_equal(expected[other], expected[name])]
    assert others == [name]  # this image tells the filters apart, so equality below pins the filter
    flag = ["--resample", resample] if resample else []
    output = tmp_path / "out"
    code, _, err = run_cli(capsys, "--input", root, "--output", output, "--size", TARGET_WH[1], TARGET_WH[0],
                           "--mode", "RGB", "--val-fraction", 0, *flag)
    assert code == 0, err
    manifest = load_manifest(str(output))
    assert manifest.options["resample"] == name and manifest.image_shape == (3, TARGET_WH[1], TARGET_WH[0])
    images, _ = read_split_numpy(str(output), "train")
    assert images.shape == (1, 3, TARGET_WH[1], TARGET_WH[0])
    np.testing.assert_array_equal(images[0], to_unit(expected[name]))


def test_resample_flag_rejects_an_unknown_filter(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exited:
        run_cli(capsys, "--input", tmp_path, "--output", tmp_path / "out", "--size", 4, 4, "--resample", "cubic")
    assert exited.value.code == 2
    assert "invalid choice: 'cubic'" in capsys.readouterr().err
