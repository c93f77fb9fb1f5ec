"""The first command a user runs, ``python pipelines/train.py --config configs/tiny_cpu.yaml`` with no
cluster (a private local Ray instance), prints its progress lines and no line that Ray's internals
repeat (e.g. Ray Train's placement-group cleaner polling a State API the instance does not serve),
checked the way ``test_job_submit.py`` checks the job log."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from _train_helpers import EXPERIMENT, run_train_cli

pytestmark = pytest.mark.slow
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEPS = 6


def test_local_run_prints_progress_and_no_line_repeated_by_ray(fmnist_shards: Path, train_sandbox: Path) -> None:
    storage = train_sandbox / "cli-runs"
    done = run_train_cli(storage, "cli-log", {
        "data.shards": fmnist_shards, "train.total_steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 3,
        "train.sample_every": 0, "train.bpd_every": 0, "train.final_bpd_images": 0, "scaling.torch_threads": 1,
        "scaling.max_failures": 0, "tracking.experiment_name": EXPERIMENT, "tracking.registered_model_name": None,
    })
    output = ANSI.sub("", done.stdout + done.stderr)
    assert done.returncode == 0, output[-4000:]

    for step in range(1, STEPS + 1):
        assert output.count(f"step {step}/{STEPS}  loss ") == 1, output[-4000:]
    assert f"checkpoint at step 3 -> {storage / 'cli-log' / 'checkpoint_00000003'}" in output
    assert f"run cli-log finished at step {STEPS}" in output
    assert "Failed to query Ray Train Controller actor state" not in output
    # A poll repeats its line at every interval (the State API one: once a second, dozens of times in
    # this run). A warning Ray retries a few times on a loaded machine is not one: the autoscaling
    # coordinator's 5 s timeout while its actor starts, retried every 20 s until the workers run.
    repeated = {line: n for line, n in Counter(output.splitlines()).items() if n > 3 and line.strip()}
    assert not repeated, "\n".join(f"{n}x {line}" for line, n in repeated.items())
