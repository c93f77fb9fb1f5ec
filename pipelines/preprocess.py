"""Turn an image source into [-1, 1] Parquet shards with Ray Data (entry point + ``run_preprocess``).

    python pipelines/preprocess.py --input SRC --output DST [--size H W] [--mode L|RGB]
        [--val-fraction F] [--seed S] [--overwrite] [--on-error skip|fail] [--limit N]
    ray job submit --working-dir . -- python pipelines/preprocess.py --input ... --output ...

SRC: a folder or ``s3://bucket/prefix`` of MNIST-family IDX files, of CIFAR-10 binary batches or
of images (one level of class sub-folders, optionally below ``train/``, ``val/``, ``test/``), or one
IDX images file or CIFAR-10 batch. The source's own splits are kept: ``t10k-*`` IDX files,
``test_batch.bin`` and a ``test/`` folder become "test", and "val" is a ``val/`` folder or else
carved from "train" (never from "test") by a seeded hash (``--val-fraction``, ``--seed``). DST: a folder or ``s3://bucket/prefix``; the layout,
the manifest and the commit protocol are described in ``pipelines/data/shards.py``. The job runs on
the Ray cluster named by ``RAY_ADDRESS`` (or the one already initialised), else starts a local
one. S3 uses the standard AWS environment variables (``AWS_ENDPOINT_URL_S3`` for S3-compatible
servers); see ``pipelines/data/storage.py``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import ray

from pipelines.data import shards, sources, staging_gate, storage
from pipelines.data.transforms import DEFAULT_MAX_PIXELS, RESAMPLE_FILTERS, BadImageError, ImageSpec, SplitSpec
from pipelines.ray_auth import connect_ray

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

    def __post_init__(self) -> None:
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


def _image_spec(config: PreprocessConfig, listing: sources.SourceListing) -> ImageSpec:
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


def _check_output(config: PreprocessConfig, listing: sources.SourceListing) -> storage.Location:
    final = storage.resolve(config.output)
    if final.is_s3 and "/" not in final.path:
        raise ValueError(f"output must be s3://bucket/prefix (a prefix inside the bucket), got {final.uri}")
    root = listing.root.uri
    if final.uri == root or final.uri.startswith(root + "/") or root.startswith(final.uri + "/"):
        raise ValueError(f"output {final.uri} overlaps the source {root}; choose a separate location")
    if shards.output_exists(final) and not config.overwrite:
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
    connect_ray()  # a local cluster with token authentication on (pipelines/ray_auth.py)
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
    listing: sources.SourceListing, options: sources.ReadOptions, target: shards.ShardTarget, config: PreprocessConfig
) -> tuple[dict[str, tuple[shards.ShardFile, ...]], list[dict[str, str]]]:
    """Run the Ray Data job into ``target``; return (shard files per split, rejected items)."""
    num_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    dataset = sources.build_dataset(
        listing, options, num_cpus=num_cpus, target_block_bytes=int(config.target_block_mib * 2**20)
    )
    report = dataset.map_batches(shards.write_shards, batch_size=None, batch_format="pyarrow", fn_kwargs={"target": target})
    # This dataset only: BadImageError reaches us unwrapped.
    report.context.raise_original_map_exception = True
    # This dataset only: no per-operator resource reservation. The plan is one fused operator
    # (read -> transform -> write) whose output is a few bytes per task, so there is nothing to
    # balance, and with the reservation on a small cluster starts by running one task alone
    # (README, "Preprocessing").
    report.context.op_resource_reservation_enabled = False
    rows = report.take_all()
    files = {
        split: tuple(sorted((shards.ShardFile(r["path"], r["rows"]) for r in rows if r["split"] == split), key=lambda s: s.path))
        for split in shards.SPLITS
    }
    rejected = sorted(({"file": r["file"], "reason": r["reason"]} for r in rows if r["file"]), key=lambda r: r["file"])
    return files, rejected


def _run_gated_job(
    listing: sources.SourceListing, options: sources.ReadOptions, tmp: storage.Location, config: PreprocessConfig
) -> tuple[dict[str, tuple[shards.ShardFile, ...]], list[dict[str, str]]]:
    """``_run_job`` into ``tmp`` with its shard writers behind a ``StagingGate``: when the job fails,
    the gate is closed and its admitted writers waited for, so no task writes into ``tmp`` after this
    returns or raises (``pipelines.data.staging_gate``); a failure caused by a bad image is re-raised
    as that ``BadImageError``."""
    gate = staging_gate.start_gate()
    try:
        return _run_job(listing, options, shards.ShardTarget(tmp, options.spec.shape, gate), config)
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


def run_preprocess(config: PreprocessConfig) -> shards.Manifest:
    """List the source, convert every item with Ray Data, and commit shards + manifest at ``config.output``.

    Images become float32 [C, H, W] with values exactly k/127.5 - 1 (uint8 k), labels int64
    (-1 where unknown). Items keep the split their source gives them ("train", "test", or "val"
    for a ``val/`` folder); without a source val, "train" items go to "val" by a seeded hash of
    their identity. The manifest's ``splits`` records where each split came from.

    Returns:
        the committed :class:`pipelines.data.shards.Manifest`.

    Raises:
        sources.SourceError: missing or empty source (before any Ray work).
        FileExistsError: the output exists and ``overwrite`` is False (before any Ray work).
        BadImageError: with ``on_error="fail"``, naming the first bad file; nothing is written.
        ValueError: bad settings (size, mode, overlapping input/output, ...), or no item at all
            could be converted (nothing is written).
    """
    fail = config.on_error == "fail"
    listing = sources.list_source(config.input, limit=config.limit, fail_on_error=fail)
    spec = _image_spec(config, listing)
    final = _check_output(config, listing)
    carved = 0.0 if listing.has_own_val else config.val_fraction  # a source's own val is used as is
    options = sources.ReadOptions(listing.root, spec, SplitSpec(carved, config.seed), fail)
    tmp = final.temporary_sibling()
    logger.info("converting %d items from %s into %s (staging in %s)", listing.num_items, listing.root.uri, final.uri, tmp.uri)
    published = False
    try:
        with ray_session():
            files, rejected = _run_gated_job(listing, options, tmp, config)
        rejected = list(listing.rejected) + rejected
        if not any(files[split] for split in shards.SPLITS):
            examples = "; ".join(f"{r['file']}: {r['reason']}" for r in rejected[:3])
            raise ValueError(f"none of the {listing.num_items} items could be converted (e.g. {examples})")
        manifest = _manifest(config, listing, spec, files, rejected)
        shards.publish(tmp, final, manifest)
        published = True
        return manifest
    finally:
        if not published:
            storage.remove_tree(tmp)


def split_origins(config: PreprocessConfig, listing: sources.SourceListing) -> dict[str, dict]:
    """The manifest's ``splits``: where each split came from (``pipelines/data/shards.py``, "Splits")."""
    def where(relpath: str) -> str:
        return listing.root.join(relpath).uri if relpath else listing.root.uri

    splits = {
        split: {"rule": "source", "sources": [where(r) for r in listing.split_sources[split]]}
        for split in shards.SPLITS if split in listing.split_sources
    }
    if "val" not in splits and "train" in splits:
        splits["val"] = {"rule": "hash", "from": "train", "fraction": float(config.val_fraction), "seed": int(config.seed)}
    return {split: splits[split] for split in shards.SPLITS if split in splits}


def _manifest(
    config: PreprocessConfig,
    listing: sources.SourceListing,
    spec: ImageSpec,
    files: dict[str, tuple[shards.ShardFile, ...]],
    rejected: list[dict[str, str]],
) -> shards.Manifest:
    counts = {split: sum(s.rows for s in files[split]) for split in shards.SPLITS}
    return shards.Manifest(
        schema_version=shards.SCHEMA_VERSION,
        image_shape=spec.shape,
        counts=counts,
        has_labels=listing.has_labels,
        normalization=dict(shards.NORMALIZATION),
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


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see module docstring)."""
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary.split(" (entry point")[0] + ".", epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="source folder, s3://bucket/prefix, or IDX images file")
    parser.add_argument("--output", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="output size in pixels (default: IDX native)")
    parser.add_argument("--mode", choices=["L", "RGB"], help="output channels (default: L for IDX, RGB for folders)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of the train items carved into val, in [0, 1) (default 0.1; unused with a val/ folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hash split (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output once the new one is complete")
    parser.add_argument("--on-error", choices=["skip", "fail"], default="skip", help="bad files: list and skip, or stop")
    parser.add_argument("--limit", type=int, help="use only the first N items of each split of the source (sorted listing)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject larger images (default 50e6)")
    parser.add_argument("--resample", choices=sorted(RESAMPLE_FILTERS), default="bicubic", help="Pillow resize filter")
    return parser


def config_from_args(args: argparse.Namespace, argv: list[str]) -> PreprocessConfig:
    """Build the config from parsed arguments; ``argv`` is recorded as the command."""
    return PreprocessConfig(
        input=args.input,
        output=args.output,
        size=tuple(args.size) if args.size else None,
        mode=args.mode,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        on_error=args.on_error,
        limit=args.limit,
        max_pixels=args.max_pixels,
        resample=args.resample,
        command=shlex.join(["python", "pipelines/preprocess.py", *argv]),
    )


def format_summary(manifest: shards.Manifest, output: str, seconds: float) -> str:
    """Human-readable end-of-run report: counts, rejected files, throughput, absolute output path."""
    total = sum(manifest.counts[split] for split in shards.SPLITS) + len(manifest.rejected)
    counts = "  ".join(f"{split}: {manifest.counts[split]}" for split in shards.SPLITS)
    lines = [
        f"{counts}  rejected: {len(manifest.rejected)}  image shape: {list(manifest.image_shape)}",
        f"throughput: {total / max(seconds, 1e-9):.1f} images/s ({total} items in {seconds:.1f} s)",
    ]
    for item in manifest.rejected[:50]:
        lines.append(f"  rejected {item['file']}: {item['reason']}")
    if len(manifest.rejected) > 50:
        lines.append(f"  ... and {len(manifest.rejected) - 50} more (see manifest.json)")
    lines.append(f"output: {output}")
    lines.append(f"manifest: {storage.resolve(output).join(shards.MANIFEST_NAME).uri}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (0 ok, 1 bad input/settings)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args, argv)
        started = time.perf_counter()
        manifest = run_preprocess(config)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_summary(manifest, storage.resolve(config.output).uri, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
