"""A preprocessing job: list a source, read, decode and transform it in Ray Data tasks that each
write their own Parquet shard into a staging folder, then publish the folder with its manifest
atomically (``pipelines/data/shards/__init__.py`` has the layout and the commit protocol).
``pipelines/preprocess.py`` is the command line around :func:`run_preprocess`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import ray

from pipelines.common.ray_auth import connect_ray
from pipelines.data import staging_gate, storage
from pipelines.data.shards.commit import output_exists, publish
from pipelines.data.shards.manifest import NORMALIZATION, SCHEMA_VERSION, SPLITS, Manifest, ShardFile
from pipelines.data.shards.writer import ShardTarget, write_shards
from pipelines.data.sources.blocks import ReadOptions
from pipelines.data.sources.dataset import build_dataset
from pipelines.data.sources.detect import list_source
from pipelines.data.sources.listing import SourceListing
from pipelines.data.transforms import DEFAULT_MAX_PIXELS, BadImageError, ImageSpec, SplitSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of one preprocessing run.

    Attributes:
        input: source location (see module docstring).
        output: destination root (local folder or ``s3://bucket/prefix``).
        size: output (H, W) in pixels; None keeps the IDX / CIFAR-10 files' own size (required for folders).
        mode: "L" or "RGB"; None means "L" for IDX sources and "RGB" for CIFAR-10 and folders.
        val_fraction: expected share of the source's "train" items carved into "val", in [0, 1)
            (unused when the source has its own ``val/``).
        seed: seed of the hash split (same seed -> same split).
        overwrite: replace an existing output (only after the new one is complete).
        on_error: "skip" records bad files in the manifest; "fail" stops at the first one.
        limit: use only the first N items of each split of the source (sorted listing; N >= 1), or all.
        max_pixels: reject images with more pixels than this (decompression bombs).
        resample: Pillow resize filter (see ``transforms.RESAMPLE_FILTERS``).
        target_block_mib: upper bound on the float32 image MiB handled by one task / one shard.
        command: the command line recorded in the manifest (defaults to a repr of this config).
        class_names: names of the labels 0..K-1 for a labelled source whose labels are bare
            integers (IDX), recorded as the manifest's ``classes``; None keeps the source's own
            names (class sub-folders, CIFAR-10's batches.meta) or none.
    """

    input: str
    output: str
    size: tuple[int, int] | None = None
    mode: Literal["L", "RGB"] | None = None
    val_fraction: float = 0.1
    seed: int = 0
    overwrite: bool = False
    on_error: Literal["skip", "fail"] = "skip"
    limit: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    resample: str = "bicubic"
    target_block_mib: float = 64.0
    command: str | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.class_names is not None:
            names = tuple(str(name).strip() for name in self.class_names)
            if not names or any(not name for name in names) or len(set(names)) != len(names):
                raise ValueError(f"class_names must be distinct non-empty names, got {list(self.class_names)!r}")
        if not str(self.input).strip() or not str(self.output).strip():
            raise ValueError(f"input and output must be non-empty, got {self.input!r} and {self.output!r}")
        if self.size is not None and (len(self.size) != 2 or any(int(s) < 1 for s in self.size)):
            raise ValueError(f"size must be two positive integers (H, W), got {self.size!r}")
        if self.mode not in (None, "L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB', got {self.mode!r}")
        if self.on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {self.on_error!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        if not 0 < self.target_block_mib <= 4096:
            raise ValueError(f"target_block_mib must be in (0, 4096], got {self.target_block_mib}")
        SplitSpec(self.val_fraction, self.seed)  # validates val_fraction and seed


def _image_spec(config: PreprocessConfig, listing: SourceListing) -> ImageSpec:
    if config.size is not None:
        height, width = (int(s) for s in config.size)
    elif listing.kind in ("idx", "cifar10"):
        sizes = {(p.rows, p.cols) for p in listing.idx_parts}
        if len(sizes) != 1:
            raise ValueError(f"IDX files have different image sizes {sorted(sizes)}; pass --size H W")
        height, width = sizes.pop()
    else:
        raise ValueError("--size H W is required for image-folder sources (their images differ in size)")
    mode = config.mode or ("L" if listing.kind == "idx" else "RGB")
    return ImageSpec(height, width, mode, config.resample, config.max_pixels)


def _check_output(config: PreprocessConfig, listing: SourceListing) -> storage.Location:
    final = storage.resolve(config.output)
    if final.is_s3 and "/" not in final.path:
        raise ValueError(f"output must be s3://bucket/prefix (a prefix inside the bucket), got {final.uri}")
    root = listing.root.uri
    if final.uri == root or final.uri.startswith(root + "/") or root.startswith(final.uri + "/"):
        raise ValueError(f"output {final.uri} overlaps the source {root}; choose a separate location")
    if output_exists(final) and not config.overwrite:
        raise FileExistsError(
            f"output {final.uri} already exists; pass --overwrite to replace it "
            "(the old output is replaced only after the new one is complete)"
        )
    return final


@contextmanager
def ray_session() -> Iterator[None]:
    """Use the initialised Ray, else connect to ``RAY_ADDRESS``, else start a local cluster.

    Shuts Ray down on exit only when this function started or connected it.
    """
    if ray.is_initialized():
        yield
        return
    connect_ray()  # a local cluster with token authentication on (pipelines/common/ray_auth.py)
    try:
        yield
    finally:
        ray.shutdown()


def _find_bad_image(error: BaseException) -> BadImageError | None:
    """The BadImageError behind a Ray task failure (Ray wraps user exceptions), if any."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BadImageError):
            return current
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    return None


def _run_job(
    listing: SourceListing, options: ReadOptions, target: ShardTarget, config: PreprocessConfig
) -> tuple[dict[str, tuple[ShardFile, ...]], list[dict[str, str]]]:
    """Run the Ray Data job into ``target``; return (shard files per split, rejected items)."""
    num_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    dataset = build_dataset(
        listing, options, num_cpus=num_cpus, target_block_bytes=int(config.target_block_mib * 2**20)
    )
    report = dataset.map_batches(write_shards, batch_size=None, batch_format="pyarrow", fn_kwargs={"target": target})
    # This dataset only: BadImageError reaches us unwrapped.
    report.context.raise_original_map_exception = True
    # This dataset only: no per-operator resource reservation. The plan is one fused operator
    # (read -> transform -> write) whose output is a few bytes per task, so there is nothing to
    # balance, and with the reservation on a small cluster starts by running one task alone
    # (benchmarks/RESULTS.md, "Preprocessing").
    report.context.op_resource_reservation_enabled = False
    rows = report.take_all()
    files = {
        split: tuple(sorted((ShardFile(r["path"], r["rows"]) for r in rows if r["split"] == split), key=lambda s: s.path))
        for split in SPLITS
    }
    rejected = sorted(({"file": r["file"], "reason": r["reason"]} for r in rows if r["file"]), key=lambda r: r["file"])
    return files, rejected


def _run_gated_job(
    listing: SourceListing, options: ReadOptions, tmp: storage.Location, config: PreprocessConfig
) -> tuple[dict[str, tuple[ShardFile, ...]], list[dict[str, str]]]:
    """``_run_job`` into ``tmp`` with its shard writers behind a ``StagingGate``: when the job fails,
    the gate is closed and its admitted writers waited for, so no task writes into ``tmp`` after this
    returns or raises (``pipelines.data.staging_gate``); a failure caused by a bad image is re-raised
    as that ``BadImageError``."""
    gate = staging_gate.start_gate()
    try:
        return _run_job(listing, options, ShardTarget(tmp, options.spec.shape, gate), config)
    except Exception as error:
        still_writing = staging_gate.close_and_drain(gate)
        if still_writing:
            logger.warning("%d task(s) still writing into %s after the job failed", still_writing, tmp.uri)
        bad = _find_bad_image(error)
        if bad is not None:
            raise BadImageError(bad.file, bad.reason) from None
        raise
    finally:
        ray.kill(gate)


def _name_classes(listing: SourceListing, class_names: tuple[str, ...] | None) -> SourceListing:
    """``listing`` with ``class_names`` as its classes (label i is ``class_names[i]``).

    Raises:
        ValueError: names given for a source without labels, or one that names its classes itself.
    """
    if class_names is None:
        return listing
    if not listing.has_labels:
        raise ValueError(f"--class-names given, but the source {listing.root.uri} has no labels")
    if listing.classes and tuple(listing.classes) != tuple(class_names):
        raise ValueError(f"--class-names given, but the source {listing.root.uri} names its classes itself: "
                         f"{list(listing.classes)}")
    return dataclasses.replace(listing, classes=tuple(class_names))


def run_preprocess(config: PreprocessConfig) -> Manifest:
    """List the source, convert every item with Ray Data, and commit shards + manifest at ``config.output``.

    Images become float32 [C, H, W] with values exactly k/127.5 - 1 (uint8 k), labels int64
    (-1 where unknown). Items keep the split their source gives them ("train", "test", or "val"
    for a ``val/`` folder); without a source val, "train" items go to "val" by a seeded hash of
    their identity. The manifest's ``splits`` records where each split came from.

    Returns:
        the committed ``pipelines.data.shards.manifest.Manifest``.

    Raises:
        SourceError: missing or empty source (before any Ray work).
        FileExistsError: the output exists and ``overwrite`` is False (before any Ray work).
        BadImageError: with ``on_error="fail"``, naming the first bad file; nothing is written.
        ValueError: bad settings (size, mode, overlapping input/output, ...), or no item at all
            could be converted (nothing is written).
    """
    fail = config.on_error == "fail"
    listing = _name_classes(list_source(config.input, limit=config.limit, fail_on_error=fail), config.class_names)
    spec = _image_spec(config, listing)
    final = _check_output(config, listing)
    carved = 0.0 if listing.has_own_val else config.val_fraction  # a source's own val is used as is
    options = ReadOptions(listing.root, spec, SplitSpec(carved, config.seed), fail)
    tmp = final.temporary_sibling()
    logger.info("converting %d items from %s into %s (staging in %s)", listing.num_items, listing.root.uri, final.uri, tmp.uri)
    published = False
    try:
        with ray_session():
            files, rejected = _run_gated_job(listing, options, tmp, config)
        rejected = list(listing.rejected) + rejected
        if not any(files[split] for split in SPLITS):
            examples = "; ".join(f"{r['file']}: {r['reason']}" for r in rejected[:3])
            raise ValueError(f"none of the {listing.num_items} items could be converted (e.g. {examples})")
        manifest = _manifest(config, listing, spec, files, rejected)
        publish(tmp, final, manifest)
        published = True
        return manifest
    finally:
        if not published:
            storage.remove_tree(tmp)


def split_origins(config: PreprocessConfig, listing: SourceListing) -> dict[str, dict]:
    """The manifest's ``splits``: where each split came from (``pipelines/data/shards/__init__.py``, "Splits")."""
    def where(relpath: str) -> str:
        return listing.root.join(relpath).uri if relpath else listing.root.uri

    splits = {
        split: {"rule": "source", "sources": [where(r) for r in listing.split_sources[split]]}
        for split in SPLITS if split in listing.split_sources
    }
    if "val" not in splits and "train" in splits:
        splits["val"] = {"rule": "hash", "from": "train", "fraction": float(config.val_fraction), "seed": int(config.seed)}
    return {split: splits[split] for split in SPLITS if split in splits}


def _manifest(
    config: PreprocessConfig,
    listing: SourceListing,
    spec: ImageSpec,
    files: dict[str, tuple[ShardFile, ...]],
    rejected: list[dict[str, str]],
) -> Manifest:
    counts = {split: sum(s.rows for s in files[split]) for split in SPLITS}
    return Manifest(
        schema_version=SCHEMA_VERSION,
        image_shape=spec.shape,
        counts=counts,
        has_labels=listing.has_labels,
        normalization=dict(NORMALIZATION),
        source=storage.resolve(config.input).uri,
        command=config.command or repr(config),
        source_checksum=listing.checksum,
        rejected=tuple(sorted(rejected, key=lambda r: r["file"])),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        classes=listing.classes,
        shards=files,
        splits=split_origins(config, listing),
        options={
            "source_kind": listing.kind,
            "size": [spec.height, spec.width],
            "mode": spec.mode,
            "resample": spec.resample,
            "max_pixels": spec.max_pixels,
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "split_rule": "val iff a train item's blake2b(f'{seed}:{identity}', 8 bytes) / 2**64 < val_fraction",
            "limit": config.limit,
            "on_error": config.on_error,
            "input_items": listing.num_items,
        },
    )
