"""Preprocessing of the real Fashion-MNIST IDX files with Ray Data: counts, exact values and labels
against an independent IDX reader, a reproducible split, safe re-runs, early errors, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _preprocess_helpers import assert_on_grid, is_val, leftovers, read_idx

from diffusion_core.images import uint8_to_float
from pipelines.data import job as preprocess_job
from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.data.shards.reader import load_manifest, read_split_numpy
from pipelines.data.sources.listing import SourceError
from pipelines.data.transforms import BadImageError

REPO_ROOT = Path(__file__).resolve().parents[1]
LIMIT, SEED, VAL = 1500, 7, 0.2


def _expected(fashion_mnist_dir: Path, limit: int | None, seed: int, val_fraction: float) -> dict:
    """Per split, the uint8 images and labels in listing order, from the oracle: t10k is "test" (the
    first ``limit``), the first ``limit`` train images are split into "train" and "val" by the hash."""
    images = read_idx(fashion_mnist_dir / "train-images-idx3-ubyte.gz")[:limit]
    labels = read_idx(fashion_mnist_dir / "train-labels-idx1-ubyte.gz")[:limit]
    val = np.array([is_val(f"train-images-idx3-ubyte:{i}", seed, val_fraction) for i in range(len(images))])
    test = (read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")[:limit],
            read_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")[:limit])
    return {"train": (images[~val], labels[~val]), "val": (images[val], labels[val]), "test": test}


@pytest.fixture(scope="module")
def subset(ray_local, fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("idx") / "fashion"
    run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(output), limit=LIMIT, seed=SEED, val_fraction=VAL))
    return output


def test_subset_values_labels_and_split_match_the_idx_files(subset: Path, fashion_mnist_dir: Path):
    manifest = load_manifest(str(subset))
    expected = _expected(fashion_mnist_dir, LIMIT, SEED, VAL)
    assert manifest.counts == {split: len(expected[split][0]) for split in ("train", "val", "test")}
    assert manifest.counts["train"] + manifest.counts["val"] == LIMIT == manifest.counts["test"] and manifest.rejected == ()
    assert manifest.has_labels and manifest.image_shape == (1, 28, 28)
    for split in ("train", "val", "test"):
        images, labels = read_split_numpy(str(subset), split)
        assert_on_grid(images)
        np.testing.assert_array_equal(images, uint8_to_float(expected[split][0][:, None]))
        np.testing.assert_array_equal(labels, expected[split][1].astype(np.int64))


def test_manifest_records_source_command_and_checksum(subset: Path, fashion_mnist_dir: Path):
    manifest = load_manifest(str(subset))
    assert manifest.source == str(fashion_mnist_dir.resolve())
    assert manifest.options["limit"] == LIMIT and manifest.options["seed"] == SEED
    assert len(manifest.source_checksum) == 64
    assert manifest.normalization["formula"].startswith("x = k / 127.5 - 1")
    assert manifest.created_at.endswith("+00:00")


def test_rerun_gives_the_same_split_and_another_seed_another(subset: Path, fashion_mnist_dir: Path, tmp_path: Path):
    again = tmp_path / "again"
    manifest = run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(again), limit=LIMIT, seed=SEED, val_fraction=VAL))
    assert manifest.source_checksum == load_manifest(str(subset)).source_checksum
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_split_numpy(str(again), split)[0], read_split_numpy(str(subset), split)[0])
    other = run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(tmp_path / "other"), limit=LIMIT, seed=SEED + 1, val_fraction=VAL))
    assert other.counts["train"] + other.counts["val"] == LIMIT
    other_val, this_val = read_split_numpy(str(tmp_path / "other"), "val")[0], read_split_numpy(str(subset), "val")[0]
    assert other_val.shape != this_val.shape or not np.array_equal(other_val, this_val)


def test_existing_output_is_refused_and_overwrite_replaces_it(ray_local, fashion_mnist_dir: Path, tmp_path: Path, monkeypatch):
    output = tmp_path / "out"
    first = run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(output), limit=200))
    first_files = sorted(p.relative_to(output) for p in output.rglob("*.parquet"))

    def no_ray():
        raise AssertionError("Ray work started although the output exists")

    with monkeypatch.context() as patch:
        patch.setattr(preprocess_job, "ray_session", no_ray)
        with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
            run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(output), limit=100))
    assert load_manifest(str(output)) == first
    assert sorted(p.relative_to(output) for p in output.rglob("*.parquet")) == first_files

    second = run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(output), limit=100, val_fraction=0.5, overwrite=True))
    assert second.counts["train"] + second.counts["val"] == 100
    listed = sorted(Path(s.path) for split in ("train", "val", "test") for s in second.shards[split])
    assert sorted(p.relative_to(output) for p in output.rglob("*.parquet")) == listed  # no shard of the first run
    assert load_manifest(str(output)) == second
    assert leftovers(output) == []


def test_missing_or_empty_source_fails_before_any_ray_work(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(preprocess_job, "ray_session", lambda: pytest.fail("Ray work started"))
    with pytest.raises(SourceError, match="does not exist"):
        run_preprocess(PreprocessConfig(input=str(tmp_path / "nowhere"), output=str(tmp_path / "out")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="is empty"):
        run_preprocess(PreprocessConfig(input=str(tmp_path / "empty"), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_truncated_idx_file_is_rejected_with_its_reason(ray_local, fashion_mnist_dir: Path, tmp_path: Path):
    source = tmp_path / "idx"
    source.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (source / name).write_bytes((fashion_mnist_dir / name).read_bytes())
    raw = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")
    header = np.array([0x0803, 50, 28, 28], dtype=">u4").tobytes()
    (source / "extra-images-idx3-ubyte").write_bytes(header + raw[:40].tobytes())  # says 50, holds 40
    manifest = run_preprocess(PreprocessConfig(input=str(source), output=str(tmp_path / "out"), limit=64))
    assert [r["file"] for r in manifest.rejected] == ["extra-images-idx3-ubyte"]
    assert "truncated" in manifest.rejected[0]["reason"]
    assert manifest.counts == {"train": 0, "val": 0, "test": 64}  # "extra" would be train, but is rejected
    with pytest.raises(BadImageError, match="extra-images-idx3-ubyte.*truncated"):
        run_preprocess(PreprocessConfig(input=str(source), output=str(tmp_path / "out2"), on_error="fail"))
    assert not (tmp_path / "out2").exists() and leftovers(tmp_path / "out2") == []


def test_cli_help_runs_without_starting_ray():
    done = subprocess.run([sys.executable, "pipelines/preprocess.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--input", "--output", "--size", "--mode", "--val-fraction", "--seed", "--overwrite", "--on-error", "--limit"):
        assert option in done.stdout


@pytest.mark.slow
def test_cli_script_starts_its_own_ray_and_reports(fashion_mnist_dir: Path, tmp_path: Path):
    output = tmp_path / "cli"
    command = [
        sys.executable, "pipelines/preprocess.py", "--input", str(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz"),
        "--output", str(output), "--limit", "300", "--size", "32", "32", "--mode", "RGB", "--seed", "3",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"output: {output.resolve()}" in done.stdout
    assert "images/s" in done.stdout and "rejected: 0" in done.stdout
    manifest = load_manifest(str(output))
    assert manifest.image_shape == (3, 32, 32)
    assert manifest.command.startswith("python pipelines/preprocess.py --input")
    images, _ = read_split_numpy(str(output), "test", limit=20)  # the t10k file is the test split
    assert_on_grid(images)
    np.testing.assert_array_equal(images[:, 0], images[:, 1])  # gray source: R == G == B
    refused = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "already exists" in refused.stderr


@pytest.mark.slow
def test_all_70000_images(ray_local, fashion_mnist_dir: Path, tmp_path: Path):
    output = tmp_path / "full"
    manifest = run_preprocess(PreprocessConfig(input=str(fashion_mnist_dir), output=str(output), seed=SEED, val_fraction=VAL))
    expected = _expected(fashion_mnist_dir, None, SEED, VAL)
    assert manifest.counts["train"] + manifest.counts["val"] == 60000 and manifest.counts["test"] == 10000
    assert manifest.rejected == ()
    for split in ("train", "val", "test"):
        images, labels = read_split_numpy(str(output), split)
        assert len(images) == len(expected[split][0]) == manifest.counts[split]
        assert_on_grid(images)
        np.testing.assert_array_equal(images, uint8_to_float(expected[split][0][:, None]))
        np.testing.assert_array_equal(labels, expected[split][1].astype(np.int64))
