"""pipelines/evaluate.py on the model registered by the session's tiny training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import EXPERIMENT, REGISTERED_MODEL
from mlflow import MlflowClient

from diffusion_core.checkpoint import load_checkpoint
from pipelines.data.shards.reader import read_split_numpy
from pipelines.evaluate import main
from pipelines.evaluation.blocks import block_seed
from pipelines.registry.model_store import fetch_checkpoint
from pipelines.registry.tracking_uri import resolve_tracking_uri

pytestmark = pytest.mark.slow
FAST = ["--threads", "1", "--samples", "4", "--sample-steps", "3", "--seed", "3", "--no-compile"]


def _block_generator() -> torch.Generator:
    """The generator of the bound's first block (``metrics.bound_blocks``) with ``--seed 3``."""
    return torch.Generator().manual_seed(block_seed(3, 0))


def _eval_run(client: MlflowClient, model_uri: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`eval.model_uri` = '{model_uri}'")
    assert len(runs) == 1
    return runs[0]


def test_exact_evaluation_of_registered_model(tiny_runs, fmnist_shards: Path, capsys) -> None:
    training = tiny_runs[2].outcome
    client = MlflowClient(resolve_tracking_uri())
    model_uri = client.get_run(training["mlflow_run_id"]).data.tags["ddpm.model_uri"]
    assert main(["--model", model_uri, "--shards", str(fmnist_shards), "--images", "2", *FAST]) == 0
    printed = capsys.readouterr().out
    run = _eval_run(client, model_uri)
    assert run.info.run_id in printed and run.info.artifact_uri in printed

    # the logged number is the exact bound of these images (same seed), sum of its terms + prior
    loaded = load_checkpoint(fetch_checkpoint(model_uri))
    images = torch.from_numpy(read_split_numpy(str(fmnist_shards), "val", limit=2)[0])
    with torch.no_grad():
        expected = loaded.diffusion.calc_bpd_loop(loaded.model, images, generator=_block_generator())
    assert run.data.metrics["eval_bpd"] == pytest.approx(float(expected["total_bpd"].double().mean()), rel=1e-6)
    assert repr(run.data.metrics["eval_bpd"]) in printed
    terms = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/bpd_terms.json")).read_text())
    assert len(terms["vb_per_t_bpd"]) == loaded.diffusion_config.num_timesteps
    assert sum(terms["vb_per_t_bpd"]) + terms["prior_bpd"] == pytest.approx(run.data.metrics["eval_bpd"], rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/bpd_per_timestep.png", "eval/samples.png", "eval/bpd_terms.json"} <= artifacts

    # provenance: tagged with the model and its training run; metrics linked to the logged model
    name, version = model_uri.removeprefix("models:/").split("/")
    tags = run.data.tags
    assert (tags["eval.model_name"], tags["eval.model_version"]) == (REGISTERED_MODEL, version)
    assert tags["eval.source_run_id"] == training["mlflow_run_id"]
    registered = client.get_model_version(name, version)
    model_id = registered.model_id or registered.source.removeprefix("models:/")
    linked = {m.key: m.value for m in client.get_logged_model(model_id).metrics or []}
    assert linked["eval_bpd"] == pytest.approx(run.data.metrics["eval_bpd"])
    assert np.isfinite(run.data.metrics["eval_prior_bpd"]) and run.data.metrics["eval_prior_bpd"] < 1e-3


def test_estimated_evaluation_of_checkpoint_folder(tiny_runs, fmnist_shards: Path) -> None:
    training = tiny_runs[1].outcome
    checkpoint = training["checkpoint"]
    assert main(["--model", checkpoint, "--shards", str(fmnist_shards), "--images", "4", "--estimate", "16",
                 "--experiment", EXPERIMENT, *FAST, "--sampler", "dpm_solver", "--order", "1"]) == 0
    run = _eval_run(MlflowClient(resolve_tracking_uri()), checkpoint)
    assert run.data.tags["eval.source_run_id"] == training["mlflow_run_id"]  # from the checkpoint's metadata
    params = run.data.params
    assert (params["sample_sampler"], params["sample_steps"], params["sample_order"]) == ("dpm_solver", "3", "1")
    assert (params["sample_spacing"], params["sample_network_evaluations"]) == ("logsnr", "3")
    # the estimate is unbiased: within 4 of its standard errors of the exact bound of the same model and images
    loaded = load_checkpoint(checkpoint)
    images = torch.from_numpy(read_split_numpy(str(fmnist_shards), "val", limit=4)[0])
    with torch.no_grad():
        exact = loaded.diffusion.calc_bpd_loop(loaded.model, images, generator=_block_generator())
    estimate, stderr = run.data.metrics["eval_bpd_estimate"], run.data.metrics["eval_bpd_estimate_stderr"]
    assert stderr > 0 and abs(estimate - float(exact["total_bpd"].mean())) <= 4 * stderr
    assert "eval_bpd" not in run.data.metrics


def test_bad_inputs_fail_with_a_message(tiny_runs, fmnist_shards: Path, tmp_path: Path, capsys) -> None:
    checkpoint = tiny_runs[1].outcome["checkpoint"]
    assert main(["--model", str(tmp_path / "missing"), "--shards", str(fmnist_shards)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--model", checkpoint, "--shards", str(tmp_path / "no-shards"), *FAST]) == 2
    assert "manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", checkpoint, "--shards", str(fmnist_shards), "--images", "0"])
    assert "'0' is neither a count >= 1 nor 'all'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", checkpoint, "--shards", str(fmnist_shards), "--sampler", "pc", "--snr", "0"])
    assert "snr=0.0 must be a number in (0.0, inf)" in capsys.readouterr().err
    assert main(["--model", checkpoint, "--shards", str(fmnist_shards), *FAST, "--sample-steps", "100000"]) == 2
    assert "num_steps=100000 must be an integer in [1, " in capsys.readouterr().err
