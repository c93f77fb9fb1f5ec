"""The staging gate of ``pipelines.data.staging_gate``: shard writers enter it, a failing job closes it
and waits for them, and a cancellation that arrives mid-write takes effect after the write, so a
failed job leaves nothing (the end-to-end check is ``test_on_error_fail_on_s3_leaves_nothing``)."""

from __future__ import annotations

import _thread
import asyncio
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
from ray.data.extensions import ArrowTensorArray

from pipelines.data import staging_gate, storage
from pipelines.data.shards.writer import ShardTarget, write_shards


def _block(n: int = 4) -> pa.Table:
    return pa.table({
        "image": ArrowTensorArray.from_numpy(np.zeros((n, 1, 2, 2), np.float32)),
        "label": pa.array(range(n), pa.int64()),
        "split": pa.array(["val" if i % 2 == 1 else "train" for i in range(n)]),
        "error": pa.array([""] * (n - 1) + ["corrupt"]),
        "file": pa.array([f"f{i}.png" for i in range(n)]),
        "block": pa.array([3] * n, pa.int64()),
    })


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def test_without_a_gate_the_shards_are_written_and_reported(tmp_path: Path) -> None:
    tmp = storage.resolve(str(tmp_path / "out.tmp-1"))
    report = write_shards(_block(), ShardTarget(tmp, (1, 2, 2))).to_pylist()
    written = sorted(r["path"] for r in report if r["path"])
    assert [r["file"] for r in report if r["file"]] == ["f3.png"]
    assert len(written) == 2 and all(p.startswith(("train/part-000003-", "val/part-000003-")) for p in written)
    assert _files(tmp_path / "out.tmp-1") == sorted(["train", "val", *written])


def test_an_open_gate_admits_writers_and_a_closed_one_refuses_them(ray_local, tmp_path: Path) -> None:
    gate = staging_gate.start_gate()
    try:
        tmp = storage.resolve(str(tmp_path / "out.tmp-2"))
        report = write_shards(_block(), ShardTarget(tmp, (1, 2, 2), gate)).to_pylist()
        assert len([r for r in report if r["path"]]) == 2  # admitted: both splits written
        assert staging_gate.close_and_drain(gate, timeout_s=5) == 0
        storage.remove_tree(tmp)
        late = write_shards(_block(), ShardTarget(tmp, (1, 2, 2), gate)).to_pylist()
        assert [r for r in late if r["path"]] == [] and [r["file"] for r in late if r["file"]] == ["f3.png"]
        assert not (tmp_path / "out.tmp-2").exists()  # a task after the close writes nothing
    finally:
        ray.kill(gate)


def test_close_and_drain_waits_for_admitted_writers(ray_local) -> None:
    gate = staging_gate.start_gate()
    try:
        assert ray.get(gate.enter.remote("a")) is True
        assert staging_gate.close_and_drain(gate, timeout_s=0.5) == 1  # still inside: the timeout expired
        assert ray.get(gate.enter.remote("b")) is False
        drained = gate.close_and_drain.remote(30.0)
        ready, _ = ray.wait([drained], timeout=0.5)
        assert ready == []  # waits while the writer is inside...
        ray.get(gate.leave.remote("b"))  # (a refused writer leaving changes nothing)
        ready, _ = ray.wait([drained], timeout=0.5)
        assert ready == []
        ray.get(gate.leave.remote("a"))
        assert ray.get(drained) == 0  # ...and returns once it has left
    finally:
        ray.kill(gate)


def test_an_interrupt_during_the_section_is_raised_after_it() -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with staging_gate.deferred_interrupts():
            _thread.interrupt_main()  # what ray.cancel does to a running task
            steps.append("write finished")
        steps.append("not reached")
    assert steps == ["write finished"]
    with staging_gate.deferred_interrupts():  # no interrupt: nothing raised
        steps.append("quiet")
    assert steps == ["write finished", "quiet"]


def test_a_writer_waiting_at_the_gate_keeps_its_cpus(ray_local) -> None:
    """While a task waits to be admitted, its CPUs stay its own: a ``ray.get`` in a task lends them
    back to the raylet, which then runs queued tasks on extra worker processes (seen as 8-10 Ray
    workers instead of 5 in a 5-second preprocessing job)."""

    class HeldGate(staging_gate.StagingGate):
        """Holds every ``enter`` until ``release``."""

        def __init__(self) -> None:
            super().__init__()
            self.held, self.waiting = asyncio.Event(), 0

        async def enter(self, token: str) -> bool:
            self.waiting += 1
            await self.held.wait()
            return await super().enter(token)

        async def release(self) -> None:
            self.held.set()

        async def count_waiting(self) -> int:
            return self.waiting

    gate = ray.remote(num_cpus=0)(HeldGate).remote()
    cpus = ray.available_resources().get("CPU", 0.0)
    assert cpus >= 1, f"the test needs a free CPU, the cluster has {cpus}"

    @ray.remote(num_cpus=cpus)
    def writer(gate) -> bool:
        with staging_gate.admitted(gate) as may_write:
            return may_write

    @ray.remote(num_cpus=1)
    def probe() -> str:
        return "ran"

    try:
        written = writer.remote(gate)
        deadline = time.monotonic() + 60
        while ray.get(gate.count_waiting.remote()) == 0:
            assert time.monotonic() < deadline, "the writer never reached the gate"
            time.sleep(0.1)
        probed = probe.remote()
        ready, _ = ray.wait([probed], timeout=4)
        assert ready == []  # every CPU is still the waiting writer's
        ray.get(gate.release.remote())
        assert ray.get(written) is True
        assert ray.get(probed) == "ran"
    finally:
        ray.kill(gate)
