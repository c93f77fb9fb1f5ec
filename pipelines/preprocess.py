"""Turn an image source into [-1, 1] Parquet shards with Ray Data (the command line; the job is ``pipelines.data.job``).

    python pipelines/preprocess.py --input SRC --output DST [--size H W] [--mode L|RGB]
        [--val-fraction F] [--seed S] [--overwrite] [--on-error skip|fail] [--limit N] [--class-names NAME ...]
    ray job submit --working-dir . -- python pipelines/preprocess.py --input ... --output ...

SRC: a folder or ``s3://bucket/prefix`` of MNIST-family IDX files, of CIFAR-10 binary batches or
of images (one level of class sub-folders, optionally below ``train/``, ``val/``, ``test/``), or one
IDX images file or CIFAR-10 batch. The source's own splits are kept: ``t10k-*`` IDX files,
``test_batch.bin`` and a ``test/`` folder become "test", and "val" is a ``val/`` folder or else
carved from "train" (never from "test") by a seeded hash (``--val-fraction``, ``--seed``). DST: a folder or ``s3://bucket/prefix``; the layout,
the manifest and the commit protocol are described in ``pipelines/data/shards/__init__.py``. The job runs on
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

from pipelines.data import storage
from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.data.shards.manifest import MANIFEST_NAME, SPLITS, Manifest
from pipelines.data.transforms import DEFAULT_MAX_PIXELS, RESAMPLE_FILTERS


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
    parser.add_argument("--class-names", nargs="+", metavar="NAME",
                        help="names of labels 0..K-1 for IDX sources (recorded as the manifest's classes), e.g. "
                             "T-shirt/top Trouser Pullover Dress Coat Sandal Shirt Sneaker Bag 'Ankle boot'")
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
        class_names=tuple(args.class_names) if args.class_names else None,
        command=shlex.join(["python", "pipelines/preprocess.py", *argv]),
    )


def format_summary(manifest: Manifest, output: str, seconds: float) -> str:
    """Human-readable end-of-run report: counts, rejected files, throughput, absolute output path."""
    total = sum(manifest.counts[split] for split in SPLITS) + len(manifest.rejected)
    counts = "  ".join(f"{split}: {manifest.counts[split]}" for split in SPLITS)
    lines = [
        f"{counts}  rejected: {len(manifest.rejected)}  image shape: {list(manifest.image_shape)}",
        f"throughput: {total / max(seconds, 1e-9):.1f} images/s ({total} items in {seconds:.1f} s)",
    ]
    for item in manifest.rejected[:50]:
        lines.append(f"  rejected {item['file']}: {item['reason']}")
    if len(manifest.rejected) > 50:
        lines.append(f"  ... and {len(manifest.rejected) - 50} more (see manifest.json)")
    lines.append(f"output: {output}")
    lines.append(f"manifest: {storage.resolve(output).join(MANIFEST_NAME).uri}")
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
