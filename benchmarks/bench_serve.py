"""Bounded load test of the Serve app: throughput and latency of /sample (DDIM) and /likelihood
(estimate) with 1, 4 and 16 concurrent clients, with and without ``@serve.batch`` batching, against
the same model called directly in this process with the same batch sizes.

What it does (loopback only):

1. Serves a checkpoint (``--model-uri``; by default a randomly initialized model of
   ``--config``, saved with ``save_checkpoint`` in a temp dir) on a private local Ray cluster
   (``tooling.local_cluster``) with ``deploy/serve_config.yaml``, one model replica of 1 CPU.
2. For each ``max_batch_size`` in ``--batch-sizes`` (changed through ``user_config``, so the
   replica reconfigures in place), each endpoint and each client count: every client sends
   ``--requests-per-client`` requests back to back (at most ``--max-seconds`` per cell), one
   image per request. Requests/s = completed requests / wall time; p50/p99 of per-request latency.
3. Direct baseline, measured right after each batched cell (same machine load): the replica's
   own compute (``deploy.model_runner.ModelRunner``: ``sample_many`` / ``likelihood_many``, i.e.
   ``ddim_sample_loop`` / ``calc_bpd_estimate`` on the network of ``--network``) on min(clients,
   largest batch size) one-image requests at once, in this process, single-threaded like the replica.
4. CPU time per request of the model replica, of all cluster processes, and of the direct
   calls: on a machine shared with other work, wall-clock throughput depends on how the
   scheduler splits the cores; CPU time per request does much less.

Prints a table and writes JSON (default ``benchmarks/results/bench_serve.json``). Needs the dev
extra (requests, psutil). Example::

    python benchmarks/bench_serve.py --clients 1 4 16 --batch-sizes 1 8 --requests-per-client 8

``--compare-networks eager compiled padded exported`` measures instead, in this process and one run,
the replica's sampling throughput with each network mode (``benchmarks/serve_networks.py``; JSON
``benchmarks/results/bench_serve_networks.json``): how the default ``network`` was chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import requests
import torch
import yaml
from cli import bench_parser, default_output, require_at_least
from machine import machine_info
from report import build_report, load_average_1m, write_report
from serve_networks import compare_networks
from table import Column, print_table

from deploy.config import DEFAULT_NETWORK
from deploy.model_runner import LikelihoodJob, SampleJob, load_runner
from diffusion_core import DiffusionConfig, UNet, UNetConfig
from diffusion_core.checkpoint import read_checkpoint_config, save_checkpoint
from diffusion_core.inference_network import NETWORK_MODES
from pipelines.registry.model_store import fetch_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test tooling: tests/tooling/
from tooling.local_cluster import LocalRayCluster, derive_serve_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "bench_serve"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = bench_parser(SCRIPT, __doc__)
    parser.add_argument("--model-uri", help="model to serve (models:/..., runs:/..., s3://... or a folder); "
                                            "default: a random-init model of --config")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""),
                        help="MLFLOW_TRACKING_URI for the replicas (for models:/ and runs:/ URIs)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "fashion_mnist.yaml",
                        help="YAML with model/diffusion sections for the default random-init model")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per cell")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8],
                        help="max_batch_size values to compare (8: deploy/serve_config.yaml)")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends per cell")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time bound of one cell")
    parser.add_argument("--ddim-steps", type=int, default=5, help="DDIM steps of each /sample request")
    parser.add_argument("--num-samples", type=int, default=8, help="K of each /likelihood estimate request")
    parser.add_argument("--network", choices=NETWORK_MODES, default=DEFAULT_NETWORK,
                        help="the model deployment's user_config.network, also used by the direct baseline")
    parser.add_argument("--compare-networks", nargs="+", choices=NETWORK_MODES, metavar="MODE",
                        help="instead of the Serve load test: the replica's DDIM throughput with each of these "
                             f"networks ({', '.join(NETWORK_MODES)}) and eager, in this process, in one run "
                             "(benchmarks/serve_networks.py; default output bench_serve_networks.json)")
    parser.add_argument("--rounds", type=int, default=4, help="--compare-networks: rounds (the first reported apart)")
    args = parser.parse_args(argv)
    if args.compare_networks and args.output == default_output(SCRIPT):
        args.output = default_output(f"{SCRIPT}_networks")
    # --rounds >= 2: the first round is reported apart
    require_at_least(parser, args, {"clients": 1, "batch_sizes": 1, "rounds": 2, "requests_per_client": 1,
                                    "ddim_steps": 1, "num_samples": 2})
    if args.max_seconds <= 0:
        parser.error(f"--max-seconds={args.max_seconds} must be > 0")
    return args


def random_init_checkpoint(config_path: Path, folder: Path) -> Path:
    """Save a randomly initialized model of the YAML's model/diffusion sections (seed 0)."""
    sections = yaml.safe_load(config_path.read_text())
    unet_config = UNetConfig.from_dict(sections["model"])
    diffusion_config = DiffusionConfig.from_dict(sections["diffusion"])
    torch.manual_seed(0)
    return save_checkpoint(folder, UNet(unet_config).state_dict(), unet_config, diffusion_config, {"random_init": True})


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation) of ``values``, in the values' unit."""
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_cell(send: Callable[[requests.Session, int], bool], clients: int, per_client: int,
             max_seconds: float) -> dict[str, Any]:
    """``clients`` threads each calling ``send(session, i)`` ``per_client`` times (stopping at
    ``max_seconds``); returns requests/s, p50/p99 latency (ms), completed and failed counts.
    Every request goes to 127.0.0.1."""
    deadline = time.monotonic() + max_seconds

    def client(index: int) -> list[tuple[float, bool]]:
        results = []
        with requests.Session() as session:
            for i in range(per_client):
                if time.monotonic() > deadline:
                    break
                start = time.monotonic()
                ok = send(session, index * per_client + i)
                results.append((time.monotonic() - start, ok))
        return results

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        outcomes = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.monotonic() - start
    latencies = [lat * 1000 for lat, ok in outcomes if ok]
    return {"clients": clients, "completed": len(latencies), "failed": sum(not ok for _, ok in outcomes),
            "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 3),
            "p50_ms": round(percentile(latencies, 50), 1), "p99_ms": round(percentile(latencies, 99), 1)}


class DirectBaseline:
    """The replica's compute called in this process, single-threaded like the replica: the same
    ``ModelRunner`` (``load_runner``, one generator per request) running
    ``sample_many`` / ``likelihood_many`` on ``batch`` one-image requests at once, with the
    network of ``--network``."""

    def __init__(self, model_uri: str, args: argparse.Namespace, pixels: np.ndarray) -> None:
        self.runner = load_runner(model_uri, device="cpu", network=args.network)
        self.args = args
        self.pixels = pixels

    def _call(self, endpoint: str, batch: int) -> Callable[[int], Any]:
        runner, args = self.runner, self.args
        if endpoint == "sample":
            return lambda seed: runner.sample_many(
                [SampleJob(1, "ddim", args.ddim_steps, 0.0, seed + i, True) for i in range(batch)])
        return lambda seed: runner.likelihood_many(
            [LikelihoodJob(self.pixels, "estimate", args.num_samples, seed + i, False) for i in range(batch)])

    def measure(self, endpoint: str, batch: int) -> dict[str, float]:
        """Requests/s and CPU ms per request of repeated calls on ``batch`` requests (about 32
        requests, after one warm-up call)."""
        call = self._call(endpoint, batch)
        call(0)
        repeats, start, cpu_start = max(2, 32 // batch), time.monotonic(), time.process_time()
        for i in range(repeats):
            results = call(1000 * (i + 1))
            assert not any(isinstance(r, Exception) for r in results), results
        wall, cpu = time.monotonic() - start, time.process_time() - cpu_start
        return {"requests_per_s": round(batch * repeats / wall, 3),
                "cpu_ms_per_request": round(1000 * cpu / (batch * repeats), 1)}


def serve_cells(cluster: Any, model_uri: str, args: argparse.Namespace, pixels: np.ndarray, work_dir: Path,
                direct: DirectBaseline) -> list[dict[str, Any]]:
    """All (max_batch_size, endpoint, clients) cells against the served app. Each cell at the
    largest batch size is followed by the direct baseline with batch min(clients, max_batch_size),
    so both see the same machine load."""
    sample_body = {"num_images": 1, "sampler": "ddim", "num_steps": args.ddim_steps, "format": "npy"}
    likelihood_body = json.dumps({"pixels": pixels.tolist(), "num_samples": args.num_samples}).encode()

    def sample(session: requests.Session, i: int) -> bool:
        return session.post(f"{cluster.http}/sample", json={**sample_body, "seed": i}, timeout=300).status_code == 200

    def likelihood(session: requests.Session, i: int) -> bool:
        response = session.post(f"{cluster.http}/likelihood", data=likelihood_body, timeout=300,
                                headers={"content-type": "application/json"})
        return response.status_code == 200

    cells = []
    for max_batch_size in args.batch_sizes:
        config = derive_serve_config(args.tracking_uri or f"sqlite:///{work_dir / 'mlflow.db'}", cluster, model_uri,
                                     {"max_num_steps": max(1000, args.ddim_steps)}, max_batch_size=max_batch_size)
        model = next(d for d in config["applications"][0]["deployments"] if d["name"] == "DDPMModel")
        model["max_ongoing_requests"] = max(32, 2 * max(args.clients))
        model["user_config"]["network"] = args.network
        cluster.serve_deploy(config, work_dir / f"serve_config_b{max_batch_size}.yaml")
        _wait_for_batch_size(cluster.http, max_batch_size)
        run_cell(sample, 2, 2, args.max_seconds)  # warm-up
        run_cell(likelihood, 2, 2, args.max_seconds)
        replica_pid = requests.get(f"{cluster.http}/model", timeout=30).json()["replica"]["pid"]
        for endpoint, send in (("sample", sample), ("likelihood", likelihood)):
            for clients in args.clients:
                before = cluster.cpu_seconds()
                cell = {"endpoint": endpoint, "max_batch_size": max_batch_size,
                        **run_cell(send, clients, args.requests_per_client, args.max_seconds)}
                after = cluster.cpu_seconds()
                done = max(cell["completed"], 1)
                cell["replica_cpu_ms_per_request"] = round(1000 * (after[replica_pid] - before[replica_pid]) / done, 1)
                cell["cluster_cpu_ms_per_request"] = round(
                    1000 * sum(used - before.get(pid, 0.0) for pid, used in after.items()) / done, 1)
                if max_batch_size == max(args.batch_sizes):
                    cell["direct_batch"] = min(clients, max_batch_size)
                    cell["direct"] = direct.measure(endpoint, cell["direct_batch"])
                print(f"  {endpoint:10s} max_batch_size={max_batch_size:<3d} clients={clients:<3d} "
                      f"{cell['requests_per_s']:8.2f} req/s  p50 {cell['p50_ms']:8.1f} ms  p99 {cell['p99_ms']:8.1f} ms"
                      f"  failed {cell['failed']}  replica CPU {cell['replica_cpu_ms_per_request']} ms/req"
                      f"  direct {cell.get('direct', '-')}", flush=True)
                cells.append(cell)
    return cells


def _wait_for_batch_size(http: str, max_batch_size: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = requests.get(f"{http}/model", timeout=10)
            if info.ok and info.json().get("batching", {}).get("max_batch_size") == max_batch_size:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the app did not report max_batch_size={max_batch_size} within {timeout_s} s")


def summarize(cells: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (endpoint, clients): serve req/s per batch size, batching speed-up, ratio to direct."""
    smallest, largest = min(args.batch_sizes), max(args.batch_sizes)
    rows = []
    for endpoint in ("sample", "likelihood"):
        for clients in args.clients:
            by_batch = {c["max_batch_size"]: c for c in cells if c["endpoint"] == endpoint and c["clients"] == clients}
            batched, unbatched = by_batch[largest], by_batch[smallest]
            baseline = batched["direct"]
            rows.append({
                "endpoint": endpoint, "clients": clients,
                "rps_batch_1": unbatched["requests_per_s"], "rps_batched": batched["requests_per_s"],
                "p50_ms_batched": batched["p50_ms"], "p99_ms_batched": batched["p99_ms"],
                "batching_speedup": round(batched["requests_per_s"] / unbatched["requests_per_s"], 2),
                "direct_batch": batched["direct_batch"], "direct_rps_same_batch": baseline["requests_per_s"],
                "serve_over_direct": round(batched["requests_per_s"] / baseline["requests_per_s"], 2),
                "replica_cpu_ms_batch_1": unbatched["replica_cpu_ms_per_request"],
                "replica_cpu_ms_batched": batched["replica_cpu_ms_per_request"],
                "cluster_cpu_ms_batched": batched["cluster_cpu_ms_per_request"],
                "direct_cpu_ms": baseline["cpu_ms_per_request"],
                "direct_over_replica_cpu": round(
                    baseline["cpu_ms_per_request"] / batched["replica_cpu_ms_per_request"], 2),
            })
    return rows


def show(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Throughput table, then the CPU-time table (CPU ms per request, robust to a busy machine)."""
    largest, smallest = max(args.batch_sizes), min(args.batch_sizes)
    first = [Column("endpoint", "endpoint", align="<"), Column("clients", "clients")]
    print()
    print_table(rows, [*first, *(Column(*c) for c in (
        (f"req/s b={smallest}", "rps_batch_1", ".2f"), (f"req/s b={largest}", "rps_batched", ".2f"),
        ("p50 ms", "p50_ms_batched", ".1f"), ("p99 ms", "p99_ms_batched", ".1f"),
        ("speed-up", "batching_speedup", ".2f"), ("direct", "direct_rps_same_batch", ".2f"),
        ("serve/direct", "serve_over_direct", ".2f"),
    ))], "throughput (wall clock)")
    print()
    print_table(rows, [*first, *(Column(*c) for c in (
        (f"replica b={smallest}", "replica_cpu_ms_batch_1", ".1f"),
        (f"replica b={largest}", "replica_cpu_ms_batched", ".1f"),
        ("all Ray", "cluster_cpu_ms_batched", ".1f"), ("direct", "direct_cpu_ms", ".1f"),
        ("direct/replica", "direct_over_replica_cpu", ".2f"),
    ))], "CPU ms per request")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the load test (or ``--compare-networks``), print the tables, write the JSON."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.compare_networks:
        result = compare_networks(args, argv)
        print(f"winner: {result['winner']}\nwrote {args.output.resolve()}")
        return
    load_start = load_average_1m()
    torch.set_num_threads(1)  # as the replica (num_cpus: 1)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work_dir = Path(tmp)
        model_uri = args.model_uri or str(random_init_checkpoint(args.config, work_dir / "checkpoint"))
        model_dir = fetch_checkpoint(model_uri, str(work_dir / "fetched"))
        unet_config, _, _ = read_checkpoint_config(model_dir)
        size, channels = unet_config.image_size, unet_config.in_channels
        pixels = np.random.default_rng(0).integers(0, 256, (1, size, size, channels), dtype=np.uint8)

        direct = DirectBaseline(str(model_dir), args, pixels)
        cluster = LocalRayCluster(num_cpus=4)
        try:
            cells = serve_cells(cluster, model_uri, args, pixels, work_dir, direct)
        finally:
            cluster.stop()

    rows = summarize(cells, args)
    show(rows, args)
    figures = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"image_size": size, "in_channels": channels,
                  "uri": args.model_uri or f"random init of {args.config}"},
        "cells": cells,
        "summary": rows,
    }
    report = build_report(SCRIPT, argv, machine_info(torch.device("cpu")), load_start, figures)
    print(f"\nwrote {write_report(args.output, report)}")


if __name__ == "__main__":
    main()
