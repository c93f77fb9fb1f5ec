"""The staging protocol of ``pipelines.shards``: a task that writes into an abandoned staging
folder (the job failed while it ran) removes the folder, so a failed job leaves nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowTensorArray

from pipelines import shards, storage


def _block(n: int = 4) -> pa.Table:
    return pa.table({
        "image": ArrowTensorArray.from_numpy(np.zeros((n, 1, 2, 2), np.float32)),
        "label": pa.array(range(n), pa.int64()),
        "is_val": pa.array([i % 2 == 1 for i in range(n)]),
        "error": pa.array([""] * (n - 1) + ["corrupt"]),
        "file": pa.array([f"f{i}.png" for i in range(n)]),
        "block": pa.array([3] * n, pa.int64()),
    })


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def test_live_staging_keeps_the_shards_and_reports_them(tmp_path: Path) -> None:
    tmp = storage.resolve(str(tmp_path / "out.tmp-1"))
    shards.open_staging(tmp)
    report = shards.write_shards(_block(), shards.ShardTarget(tmp, (1, 2, 2))).to_pylist()
    written = sorted(r["path"] for r in report if r["path"])
    assert [r["file"] for r in report if r["file"]] == ["f3.png"]
    assert len(written) == 2 and all(p.startswith(("train/part-000003-", "val/part-000003-")) for p in written)
    assert _files(tmp_path / "out.tmp-1") == sorted([shards.LIVE_MARKER, "train", "val", *written])


def test_a_task_finishing_after_the_job_was_abandoned_removes_the_staging_folder(tmp_path: Path) -> None:
    tmp = storage.resolve(str(tmp_path / "out.tmp-2"))
    shards.open_staging(tmp)
    shards.write_shards(_block(), shards.ShardTarget(tmp, (1, 2, 2)))  # an earlier task, kept
    shards.abandon_staging(tmp)
    assert _files(tmp_path / "out.tmp-2") == []
    assert not shards.staging_is_live(tmp)
    shards.write_shards(_block(), shards.ShardTarget(tmp, (1, 2, 2)))  # a late task of the failed job
    assert not (tmp_path / "out.tmp-2").exists()
    assert _files(tmp_path) == []
