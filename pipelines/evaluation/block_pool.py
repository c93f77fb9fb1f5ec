"""Numbered blocks of work mapped over a pool of Ray Data actors that each hold one model.

The FD's samples (``distributed_sampling``) and the bound over a split (``split_bound``) are both
cut into blocks 0 .. B-1 of consecutive indices; block b is computed alone, by the same Ray-free
function whichever actor gets it, with a generator seeded from ``(seed, b)`` (``blocks.block_seed``).
:func:`map_blocks` maps the block ids 0 .. B-1 (``ray.data.from_items``) with ``map_batches`` onto a fixed pool of actors
(``ActorPoolStrategy(size=workers)``; one GPU each when the cluster has GPUs) and puts the rows they return
back in index order, so the result depends on (model, work, block size, seed) and the hardware,
never on how many actors shared it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from diffusion_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint
from pipelines.common.ray_auth import connect_ray


def checkpoint_files(checkpoint: str | Path) -> dict[str, bytes]:
    """The bytes of a local core checkpoint folder (``model.safetensors`` + ``config.json``), which
    the actors rebuild the model from, so no shared disk is needed.

    Raises:
        FileNotFoundError: when the folder lacks one of the two files.
    """
    folder, files = Path(checkpoint), {}
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint folder {folder.resolve()} has no {name}")
        files[name] = (folder / name).read_bytes()
    return files


class ModelActor:
    """Base of the pool's actors: the model rebuilt from ``checkpoint_files`` bytes on ``self.device``
    (``cuda`` when ``use_gpu`` and one is visible), torch's intra-op threads set to ``threads``
    (Ray sets ``OMP_NUM_THREADS`` to the actor's CPUs, not torch)."""

    def __init__(self, files: dict[str, bytes], use_gpu: bool, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self._tmp = tempfile.TemporaryDirectory(prefix="ddpm-actor-")
        for name, data in files.items():
            Path(self._tmp.name, name).write_bytes(data)
        self.loaded = load_checkpoint(self._tmp.name, device=self.device)


def map_blocks(
    actor: type[ModelActor], constructor_kwargs: dict[str, Any], blocks: int, expected_rows: int, *,
    workers: int, blocks_per_batch: int = 1, use_gpu: bool | None = None,
) -> dict[str, np.ndarray]:
    """Run ``actor(**constructor_kwargs, use_gpu=...)`` on every block id of ``range(blocks)`` over Ray.

    Args:
        actor: a :class:`ModelActor` whose ``__call__({"id": int64 [b]})`` returns a dict of
            arrays with an int64 ``"index"`` column (one row per item of those blocks).
        expected_rows: the items of all blocks; the returned indices must be exactly 0 .. that - 1.
        workers: actors in the pool (>= 1), each with 1 CPU (or 1 GPU; at most the cluster's, with a
            note on stderr when fewer are there); blocks_per_batch: blocks per
            Ray Data batch (changes the split, not the results); use_gpu: ``None``: when the
            cluster has GPUs.

    Returns:
        every column, concatenated and sorted by ``"index"``.

    Raises:
        ValueError: on blocks, workers or blocks_per_batch < 1; RuntimeError: if the actors returned
            other indices than 0 .. expected_rows - 1.
    """
    for name, value in (("blocks", blocks), ("workers", workers), ("blocks_per_batch", blocks_per_batch)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    connect_ray()
    resources = ray.cluster_resources()
    if use_gpu is None:
        use_gpu = resources.get("GPU", 0) > 0
    slots = int(resources.get("GPU" if use_gpu else "CPU", 0))
    if 1 <= slots < workers:  # a fixed pool larger than the cluster would wait for actors that never start
        print(f"note: {workers} workers asked, the cluster has {slots} {'GPU' if use_gpu else 'CPU'}s: "
              f"using {slots}", file=sys.stderr, flush=True)
        workers = slots
    # The block ids are made on the driver (``from_items``), not by a read task: a read task needs a
    # CPU of its own, and with every CPU held by the pool's actors (2 workers on a 2-CPU node) it
    # would never run, and nothing would.
    dataset = ray.data.from_items([{"id": block} for block in range(blocks)],
                                  override_num_blocks=min(blocks, max(1, workers * 2)))
    mapped = dataset.map_batches(
        actor, batch_size=blocks_per_batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(workers, blocks)),
        fn_constructor_kwargs={**constructor_kwargs, "use_gpu": use_gpu}, num_gpus=1 if use_gpu else 0, num_cpus=1,
    )
    parts: dict[str, list[np.ndarray]] = {}
    for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
        for name, column in batch.items():
            parts.setdefault(name, []).append(column)
    columns = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    order = np.argsort(columns["index"], kind="stable")
    if not np.array_equal(columns["index"][order], np.arange(expected_rows)):
        raise RuntimeError(f"Ray Data returned indices {columns['index'][order][:8]}..., expected 0..{expected_rows - 1}")
    return {name: column[order] for name, column in columns.items()}
