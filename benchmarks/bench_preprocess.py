"""Benchmark the preprocessing job: Ray Data (``run_preprocess``) vs one process vs ``multiprocessing.Pool``.

Measured on this machine, in one run:

1. Photographs: JPEG files of 512x512 cut at random from the two photos scikit-learn ships
   (each photo is first upscaled so its shorter side is 640 px, as they are only 427 px tall),
   decoded, resized to 64x64 RGB and written as shards.
2. Fashion-MNIST as 70,000 tiny PNG files (28x28, class sub-folders), the same three ways, plus a
   diagnosis of where per-file time goes (Ray's ``read_binary_files`` vs the product's reading of
   its own listing inside ``map_batches``), bytes only, on 20,000 of the files.
3. Peak memory (RSS) of the Ray path for 10k vs 70k of those PNGs.

The Ray path is exactly the product's ``pipelines.data.job.run_preprocess`` (on a Ray started
here with ``num_cpus=2`` and warmed up by a small run, so the timed runs do not include starting
worker processes). The two baselines do the same work with the same functions, block for block:
``list_source``, then for each block ``read_image_files`` (Pillow) and
``write_shards`` (pyarrow), in a plain loop or in ``multiprocessing.Pool(2)`` (forkserver
context started before Ray, modules preloaded; pool start-up is inside the timing).

The machine is shared, so the three ways run interleaved, ``--repeats`` rounds, and the fastest
run of each way (the least disturbed) is reported with all wall times and the 1-minute load
average before each run. psutil samples every 50 ms: peak of the summed resident set sizes of
this process plus the way's workers (Ray worker processes: task workers and Ray Data's stats /
coordinator actors; or the pool processes), and their CPU seconds; Ray's daemons (GCS, raylet,
dashboard and runtime-env agents) are reported separately.

    python benchmarks/bench_preprocess.py            # full run (several minutes)
    python benchmarks/bench_preprocess.py --quick    # smoke run
Writes ``benchmarks/results/bench_preprocess.json`` and prints a table.
"""

from __future__ import annotations

import gzip
import multiprocessing
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import ray
import torch
from cli import bench_parser
from machine import machine_info
from PIL import Image
from report import build_report, load_average_1m, write_report
from table import Column, print_table
from timing import time_calls

from pipelines.common.ray_auth import init_local_ray
from pipelines.data import storage
from pipelines.data.job import PreprocessConfig, run_preprocess
from pipelines.data.shards.writer import ShardTarget, write_shards
from pipelines.data.sources.blocks import ReadOptions
from pipelines.data.sources.dataset import input_blocks
from pipelines.data.sources.detect import list_source
from pipelines.data.sources.image_folder import read_image_files
from pipelines.data.transforms import ImageSpec, SplitSpec

SCRIPT = "bench_preprocess"
DEFAULT_FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
NUM_CPUS = 2
TARGET_BLOCK_BYTES = 64 * 2**20


# ----------------------------------------------------------------------------- data sets


def make_photo_jpegs(folder: Path, count: int, seed: int = 0) -> Path:
    """Write ``count`` 512x512 JPEGs cut at random from scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    marker = folder / f".complete-{count}-{seed}"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    photos = []
    for array in load_sample_images().images:
        image = Image.fromarray(array)
        scale = 640 / min(image.size)
        photos.append(image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC))
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        left = int(rng.integers(0, photo.width - 512 + 1))
        top = int(rng.integers(0, photo.height - 512 + 1))
        crop = photo.crop((left, top, left + 512, top + 512))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"photo{i % len(photos)}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, format="JPEG", quality=90)
    marker.touch()
    return folder


def make_fashion_pngs(folder: Path, fashion_dir: Path, count: int) -> Path:
    """Write the first ``count`` Fashion-MNIST images (train, then t10k) as PNGs in class folders."""
    marker = folder / f".complete-{count}"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    written = 0
    for split in ("train", "t10k"):
        with gzip.open(fashion_dir / f"{split}-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(fashion_dir / f"{split}-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)
        for i, (image, label) in enumerate(zip(images, labels)):
            if written == count:
                break
            path = folder / f"class{label}" / f"{split}-{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path, format="PNG")
            written += 1
    marker.touch()
    return folder


# ----------------------------------------------------------------------------- process sampling


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _role(process: psutil.Process) -> str:
    """"ray" for Ray worker processes (task workers and Ray Data's own actors), "pool" for the
    forkserver pool processes, "daemon" for anything else (GCS, raylet, agents, log monitor)."""
    text = " ".join(process.cmdline())
    if (text.startswith("ray::") and not text.startswith(RAY_AGENTS)) or "default_worker.py" in text:
        return "ray"
    if "forkserver" in text:
        return "pool"
    return "daemon"


class ProcessMonitor:
    """Samples (every ``interval`` s, in a thread) this process plus its descendant processes of one role.

    Tracks the peak of their summed resident set size and their CPU seconds (user + system) spent
    between enter and exit; processes that exit between two samples lose at most one interval.
    Other descendants (Ray's GCS, raylet, agents) are tracked as "daemons" for RSS only.
    """

    def __init__(self, role: str, interval: float = 0.05) -> None:
        self.role, self.interval = role, interval
        self.peak_rss = 0
        self.peak_daemon_rss = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tracked(self) -> list[tuple[psutil.Process, bool]]:
        me = psutil.Process()
        found = [(me, True)]
        for child in me.children(recursive=True):
            try:
                found.append((child, _role(child) == self.role))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def _sample(self, first: bool = False) -> None:
        rss = daemon_rss = 0
        for process, tracked in self._tracked():
            try:
                memory = process.memory_info().rss
                cpu = sum(process.cpu_times()[:2])
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if not tracked:
                daemon_rss += memory
                continue
            rss += memory
            if first:
                self._cpu_start[process.pid] = cpu
            self._cpu_start.setdefault(process.pid, 0.0)
            self._cpu_last[process.pid] = cpu
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_daemon_rss = max(self.peak_daemon_rss, daemon_rss)

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds the tracked processes spent while monitored."""
        return sum(self._cpu_last[pid] - self._cpu_start[pid] for pid in self._cpu_last)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> ProcessMonitor:
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ----------------------------------------------------------------------------- the three ways


@dataclass(frozen=True)
class Job:
    """One conversion task: where from, where to, what size/mode."""

    source: Path
    output: Path
    size: int
    mode: str
    limit: int | None = None


def _blocks(job: Job):
    """The product's listing and block division, for the baselines (same work, other executors)."""
    listing = list_source(str(job.source), limit=job.limit)
    spec = ImageSpec(job.size, job.size, job.mode)
    options = ReadOptions(listing.root, spec, SplitSpec(0.1, 0), False)
    target = ShardTarget(storage.resolve(str(job.output)), spec.shape)
    tables = input_blocks(listing, spec, num_cpus=NUM_CPUS, target_block_bytes=TARGET_BLOCK_BYTES)
    return listing, options, target, tables


def _convert_block(args) -> int:
    table, options, target = args
    report = write_shards(read_image_files(table, options), target)
    return int(sum(report.column("rows").to_pylist()))


def run_single(job: Job) -> int:
    """The baseline: one process, a plain loop over the blocks."""
    listing, options, target, tables = _blocks(job)
    return sum(_convert_block((t, options, target)) for t in tables)


def _pool_context():
    """A forkserver context whose server preloads the pipeline modules (it is started before Ray)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipelines.data.sources.image_folder", "pipelines.data.shards.writer", "pipelines.data.transforms",
                                     "ray.data.extensions"])
    return context


def run_pool(job: Job) -> int:
    """The same loop spread over ``multiprocessing.Pool(2)`` (forkserver; pool start-up included)."""
    listing, options, target, tables = _blocks(job)
    with _pool_context().Pool(NUM_CPUS) as pool:
        return sum(pool.imap_unordered(_convert_block, [(t, options, target) for t in tables]))


def run_ray(job: Job) -> int:
    """The product: ``run_preprocess`` on the running Ray cluster."""
    config = PreprocessConfig(
        input=str(job.source),
        output=str(job.output),
        size=(job.size, job.size),
        mode=job.mode,
        limit=job.limit,
        overwrite=True,
        target_block_mib=TARGET_BLOCK_BYTES / 2**20,
    )
    manifest = run_preprocess(config)
    return sum(manifest.counts.values())


WAYS = {"single": run_single, "pool": run_pool, "ray": run_ray}


def measure(way: str, job: Job) -> dict:
    """One timed run of ``way`` on ``job`` (fresh output), with peak RSS and CPU seconds."""
    shutil.rmtree(job.output, ignore_errors=True)
    load_before = load_average_1m()
    counts: list[int] = []
    with ProcessMonitor("ray" if way == "ray" else "pool") as monitor:
        seconds = time_calls(lambda _: counts.append(WAYS[way](job)), 1).total
    converted = counts[0]
    shutil.rmtree(job.output, ignore_errors=True)
    result = {
        "way": way,
        "images": converted,
        "seconds": round(seconds, 3),
        "images_per_s": round(converted / seconds, 1),
        "cpu_seconds": round(monitor.cpu_seconds, 2),
        "peak_rss_mib": round(monitor.peak_rss / 2**20, 1),
        "ray_daemons_rss_mib": round(monitor.peak_daemon_rss / 2**20, 1),
        "load_average_1m": {"start": round(load_before, 2), "end": None},
    }
    print(f"  {way:<7} {converted:>6} images {seconds:7.2f} s {result['images_per_s']:8.1f} img/s "
          f"cpu {result['cpu_seconds']:6.1f} s  peak {result['peak_rss_mib']:5.0f} MiB  (load {load_before:.1f})", flush=True)
    return result


def best_of(runs: list[dict]) -> dict:
    """The fastest run, with every run's wall time attached (the machine is shared: best = least disturbed)."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["all_seconds"] = [r["seconds"] for r in runs]
    best["all_cpu_seconds"] = [r["cpu_seconds"] for r in runs]
    best["median_cpu_seconds"] = float(np.median(best["all_cpu_seconds"]))
    return best


def _read_bytes_only(batch, root: storage.Location):
    """Diagnostic UDF: read the listed files' bytes (no decoding); returns their sizes."""
    sizes = [len(storage.read_bytes(root.join(f))) for f in batch.column("file").to_pylist()]
    return pa.table({"size": sizes})


def diagnose_read_binary_files(folder: Path, count: int) -> dict:
    """Where per-file time goes for tiny files: Ray's ``read_binary_files`` vs reading our listing in map tasks.

    Both only read the bytes of the same ``count`` PNG files (no decoding), in 8 blocks, on the
    running 2-CPU Ray; the product uses the second way. Reports the driver-side set-up time (for
    ``read_binary_files`` this includes one ``get_file_info`` per path) and the execution wall
    time and CPU seconds per file of the Ray workers.
    """
    listing = list_source(str(folder), limit=count)
    paths = [listing.root.join(item).path for item in listing.items]
    result = {"files": len(paths)}
    for name in ("read_binary_files", "listing_in_map_batches"):
        started = time.perf_counter()
        if name == "read_binary_files":
            dataset = ray.data.read_binary_files(paths, include_paths=True, override_num_blocks=8)
        else:
            tables = input_blocks(listing, ImageSpec(28, 28, "L"), num_cpus=2, target_block_bytes=2**40)
            dataset = ray.data.from_arrow(tables).map_batches(
                _read_bytes_only, batch_size=None, batch_format="pyarrow", fn_kwargs={"root": listing.root}
            )
        setup = time.perf_counter() - started
        with ProcessMonitor("ray") as monitor:
            started = time.perf_counter()
            rows = dataset.materialize().count()
            seconds = time.perf_counter() - started
        result[name] = {
            "rows": rows,
            "driver_setup_s": round(setup, 3),
            "execution_s": round(seconds, 3),
            "files_per_s": round(rows / (setup + seconds), 1),
            "cpu_us_per_file": round(1e6 * monitor.cpu_seconds / rows, 1),
        }
        print(f"  diagnose {name:<24} setup {setup:6.2f} s  run {seconds:6.2f} s  "
              f"{result[name]['cpu_us_per_file']:7.1f} CPU-us/file", flush=True)
    return result


def compare(rows: dict[str, dict]) -> dict:
    """The three rows of one data set, the Ray speed ratios (best wall time of the baseline / of Ray)
    and the CPU ratios (median CPU seconds of the baseline / of Ray: 1.0 means no overhead)."""
    return {
        "rows": rows,
        "ray_vs_single": round(rows["single"]["seconds"] / rows["ray"]["seconds"], 3),
        "ray_vs_pool": round(rows["pool"]["seconds"] / rows["ray"]["seconds"], 3),
        "cpu_single_over_ray": round(rows["single"]["median_cpu_seconds"] / rows["ray"]["median_cpu_seconds"], 3),
        "cpu_pool_over_ray": round(rows["pool"]["median_cpu_seconds"] / rows["ray"]["median_cpu_seconds"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; returns 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = bench_parser(SCRIPT, __doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run on small data (numbers not meaningful)")
    parser.add_argument("--workdir", default="/tmp/bench_preprocess", help="where generated inputs and outputs go")
    parser.add_argument("--fashion-dir", default=os.environ.get("FASHION_MNIST_DIR", str(DEFAULT_FASHION)))
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per way (best is kept)")
    args = parser.parse_args(argv)
    load_start = load_average_1m()
    workdir = Path(args.workdir).resolve()
    n_photos, n_png, n_small, n_diagnose = (300, 5000, 1000, 2000) if args.quick else (3000, 70000, 10000, 20000)
    repeats = args.repeats or (1 if args.quick else 3)
    print("generating inputs ...", flush=True)
    photos = make_photo_jpegs(workdir / f"photos-{n_photos}", n_photos)
    pngs = make_fashion_pngs(workdir / f"fashion-png-{n_png}", Path(args.fashion_dir), n_png)

    jobs = {
        "photos": Job(photos, workdir / "out-photos", 64, "RGB"),
        "fashion-png": Job(pngs, workdir / "out-png", 28, "L"),
    }
    with _pool_context().Pool(1) as pool:  # start the forkserver before Ray exists in this process
        pool.map(abs, [0])
    init_local_ray(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)  # token auth on
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs: dict[str, dict[str, list[dict]]] = {name: {way: [] for way in WAYS} for name in jobs}
    try:
        run_ray(Job(pngs, workdir / "warmup", 28, "L", limit=200))  # start and warm the Ray workers
        for round_index in range(repeats):  # interleaved, so that a disturbance hits all ways alike
            for name, job in jobs.items():
                print(f"round {round_index + 1}/{repeats} {name}: {job.size}x{job.size} {job.mode}", flush=True)
                for way in WAYS:
                    runs[name][way].append(measure(way, job))
        print("memory: Ray path, small vs full PNG set", flush=True)
        memory_small = measure("ray", Job(pngs, workdir / "out-mem", 28, "L", limit=n_small))
        memory_full = measure("ray", Job(pngs, workdir / "out-mem", 28, "L"))
        diagnosis = diagnose_read_binary_files(pngs, n_diagnose)
    finally:
        ray.shutdown()
        shutil.rmtree(workdir / "warmup", ignore_errors=True)
    photo_result = compare({way: best_of(r) for way, r in runs["photos"].items()})
    png_result = compare({way: best_of(r) for way, r in runs["fashion-png"].items()})

    results = {
        "cpus_used": NUM_CPUS, "quick": args.quick, "repeats": repeats,
        "photos_jpeg_512_to_64_rgb": {"images": n_photos, **photo_result},
        "fashion_png_28_l": {"images": n_png, **png_result},
        "memory_ray": {
            f"{n_small}_images_peak_rss_mib": memory_small["peak_rss_mib"],
            f"{n_png}_images_peak_rss_mib": memory_full["peak_rss_mib"],
            "ratio": round(memory_full["peak_rss_mib"] / memory_small["peak_rss_mib"], 3),
            "runs": [memory_small, memory_full],
        },
        "diagnosis_small_files": diagnosis,
    }
    show(results, n_small, n_png)
    machine = {**machine_info(torch.device("cpu")), "ray": ray.__version__}
    print(f"wrote {write_report(args.output, build_report(SCRIPT, argv, machine, load_start, results))}")
    return 0


COLUMNS = (
    Column("data set", "data_set", align="<"), Column("way", "way", align="<"), Column("images", "images"),
    Column("seconds", "seconds", ".2f"), Column("img/s", "images_per_s", ".1f"), Column("CPU s", "cpu_seconds", ".1f"),
    Column("peak RSS MiB", "peak_rss_mib", ".0f"),
)


def show(results: dict, n_small: int, n_png: int) -> None:
    """Print the comparison table."""
    print()
    keys = ("photos_jpeg_512_to_64_rgb", "fashion_png_28_l")
    print_table([{**row, "data_set": key} for key in keys for row in results[key]["rows"].values()], COLUMNS)
    for key in keys:
        print(f"{key}: speed ray/single = {results[key]['ray_vs_single']:.2f}x   ray/pool = {results[key]['ray_vs_pool']:.2f}x"
              f"   CPU single/ray = {results[key]['cpu_single_over_ray']:.2f}   pool/ray = {results[key]['cpu_pool_over_ray']:.2f}")
    diagnosis = results["diagnosis_small_files"]
    for name in ("read_binary_files", "listing_in_map_batches"):
        row = diagnosis[name]
        print(f"read {diagnosis['files']} tiny PNGs, {name}: {row['files_per_s']:.0f} files/s, "
              f"{row['cpu_us_per_file']:.0f} CPU-us/file (driver set-up {row['driver_setup_s']:.2f} s)")
    memory = results["memory_ray"]
    print(f"memory (Ray, driver + workers): {n_small} images -> {memory[f'{n_small}_images_peak_rss_mib']:.0f} MiB, "
          f"{n_png} images -> {memory[f'{n_png}_images_peak_rss_mib']:.0f} MiB (ratio {memory['ratio']:.2f})")


if __name__ == "__main__":
    raise SystemExit(main())
