"""CIFAR-10 binary batches as a source: records round-trip exactly in RGB order with their labels,
``data_batch_*`` is train and ``test_batch`` test, ``--mode L`` gives Pillow's ITU-R 601-2 luma
exactly, and a truncated batch is named in the error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _preprocess_helpers import is_val, run_cli, to_unit

from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.data.shards.reader import load_manifest, read_split_numpy
from pipelines.data.sources.listing import SourceError
from pipelines.data.transforms import BadImageError

SEED, VAL = 5, 0.3
#: (R, G, B) colours whose grey value is pinned: black, white, the primaries, and two whose exact
#: ITU-R 601-2 luma is a tie (28.5 and 21.5) that Pillow's fixed-point weights resolve downwards.
PINNED_COLOURS = {(0, 0, 0): 0, (255, 255, 255): 255, (255, 0, 0): 76, (0, 255, 0): 150, (0, 0, 255): 29,
                  (0, 0, 250): 28, (0, 4, 168): 21}


def _cifar_records(rng: np.random.Generator, n: int) -> np.ndarray:
    records = rng.integers(0, 256, size=(n, 3073), dtype=np.uint8)
    records[:, 0] = rng.integers(0, 10, size=n)
    return records


def _planes(records: np.ndarray) -> np.ndarray:
    """uint8 [N, 3, 32, 32] from records: bytes 1..1024 are R (channel 0), then G, then B; each 32x32 row-major."""
    return np.stack([records[:, 1:1025], records[:, 1025:2049], records[:, 2049:]], axis=1).reshape(-1, 3, 32, 32)


@pytest.fixture
def cifar(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    records = {"data_batch_1.bin": _cifar_records(rng, 5), "data_batch_2.bin": _cifar_records(rng, 4),
               "test_batch.bin": _cifar_records(rng, 3)}
    for name, data in records.items():
        (root / name).write_bytes(data.tobytes())
    (root / "batches.meta.txt").write_text("airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n")
    (root / "readme.html").write_text("<html></html>")
    return root, records


def test_cifar10_batches_round_trip_exactly(ray_local, cifar, tmp_path: Path):
    root, records = cifar
    manifest = run_preprocess(PreprocessConfig(input=str(root), output=str(tmp_path / "out"), seed=SEED, val_fraction=VAL))
    assert manifest.image_shape == (3, 32, 32) and manifest.has_labels and manifest.rejected == ()
    assert manifest.classes[:2] == ("airplane", "automobile") and len(manifest.classes) == 10
    assert manifest.options["source_kind"] == "cifar10"
    assert manifest.splits["train"]["sources"] == [str(root.resolve() / f"data_batch_{i}.bin") for i in (1, 2)]
    assert manifest.splits["test"]["sources"] == [str(root.resolve() / "test_batch.bin")]
    train = [(f"data_batch_{b}.bin:{i}", r) for b in (1, 2) for i, r in enumerate(records[f"data_batch_{b}.bin"])]
    expected = {
        "train": [r for name, r in train if not is_val(name, SEED, VAL)],
        "val": [r for name, r in train if is_val(name, SEED, VAL)],
        "test": list(records["test_batch.bin"]),
    }
    assert manifest.counts == {split: len(rows) for split, rows in expected.items()}
    assert all(expected.values())  # every split has a first record for the spot check below
    for split, rows in expected.items():
        images, labels = read_split_numpy(str(tmp_path / "out"), split)
        rows = np.array(rows).reshape(len(rows), 3073)
        np.testing.assert_array_equal(images, to_unit(_planes(rows)))
        np.testing.assert_array_equal(labels, rows[:, 0].astype(np.int64))
        first = expected[split][0]  # spot check by byte offset: B plane, row 0, col 1
        image = read_split_numpy(str(tmp_path / "out"), split, limit=1)[0][0]
        assert image[2, 0, 1] == np.float32(first[1 + 2048 + 1]) / np.float32(127.5) - 1, split


def test_cifar10_single_batch_file_and_grayscale(ray_local, cifar, tmp_path: Path):
    root, records = cifar
    manifest = run_preprocess(PreprocessConfig(input=str(root / "test_batch.bin"), output=str(tmp_path / "out"), mode="L",
                                               size=(16, 16)))
    assert manifest.counts == {"train": 0, "val": 0, "test": 3} and manifest.image_shape == (1, 16, 16)
    _, labels = read_split_numpy(str(tmp_path / "out"), "test")
    np.testing.assert_array_equal(labels, records["test_batch.bin"][:, 0])


def test_cifar10_mode_l_gives_the_exact_luma_of_each_pixel(ray_local, tmp_path: Path, capsys):
    """``--mode L`` at the native 32x32 is Pillow's ``convert("L")``: the ITU-R 601-2 luma
    L = R*299/1000 + G*587/1000 + B*114/1000 in 16-bit fixed point, rounded half up
    (Pillow's ``libImaging/Convert.c``: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16), computed here
    from the record bytes."""
    records = _cifar_records(np.random.default_rng(1), 4)
    pixels = records[0, 1:].reshape(3, 1024)
    for i, colour in enumerate(PINNED_COLOURS):
        pixels[:, i] = colour
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "data_batch_1.bin").write_bytes(records.tobytes())
    code, out, err = run_cli(capsys, "--input", root, "--output", tmp_path / "grey", "--mode", "L", "--val-fraction", 0)
    assert code == 0, err
    manifest = load_manifest(str(tmp_path / "grey"))
    assert manifest.options["mode"] == "L" and manifest.image_shape == (1, 32, 32) and manifest.counts["train"] == 4
    images, labels = read_split_numpy(str(tmp_path / "grey"), "train")
    r, g, b = _planes(records).astype(np.int64).transpose(1, 0, 2, 3)
    luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    assert np.abs(1000 * luma - (r * 299 + g * 587 + b * 114)).max() <= 501  # the 601-2 weights, to rounding (in 1/1000)
    assert [int(luma[0].reshape(-1)[i]) for i in range(len(PINNED_COLOURS))] == list(PINNED_COLOURS.values())
    np.testing.assert_array_equal(images[:, 0], to_unit(luma.astype(np.uint8)))
    np.testing.assert_array_equal(labels, records[:, 0].astype(np.int64))


def test_truncated_cifar10_batch_is_named_in_a_clear_error(ray_local, cifar, tmp_path: Path):
    root, _ = cifar
    whole = (root / "test_batch.bin").read_bytes()
    (root / "test_batch.bin").write_bytes(whole[:-100])
    with pytest.raises(BadImageError, match=r"test_batch\.bin.*not a multiple of the 3,073-byte record") as caught:
        run_preprocess(PreprocessConfig(input=str(root), output=str(tmp_path / "fail"), on_error="fail"))
    assert caught.value.file == "test_batch.bin"
    assert not (tmp_path / "fail").exists()
    manifest = run_preprocess(PreprocessConfig(input=str(root), output=str(tmp_path / "skip")))
    assert [r["file"] for r in manifest.rejected] == ["test_batch.bin"] and "truncated" in manifest.rejected[0]["reason"]
    assert manifest.counts["test"] == 0 and "test" not in manifest.splits
    for name in ("data_batch_1.bin", "data_batch_2.bin"):
        (root / name).unlink()
    with pytest.raises(SourceError, match=r"no usable CIFAR-10 batches.*test_batch\.bin"):
        run_preprocess(PreprocessConfig(input=str(root), output=str(tmp_path / "none")))
