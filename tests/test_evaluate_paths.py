"""``pipelines/evaluate.py`` paths on the session's tiny Fashion-MNIST shards and a small UNet whose
output depends on its input (``_unet_helpers.computing_unet``): the bound computed in this process
through ``torch.compile`` against the same bound over eager Ray actors, and the FD reference flags
end to end (with a stand-in Inception, ``_inception_standin``, so no classifier is trained)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _eval_helpers import latest_run, save_computing_checkpoint
from _inception_standin import save_stand_in
from mlflow import MlflowClient

from pipelines.evaluate import main
from pipelines.evaluation.fd import reference_and_floor_slices
from pipelines.registry.tracking_uri import resolve_tracking_uri

pytestmark = pytest.mark.slow
EXPERIMENT = "ddpm-eval-paths-test"
COMMON = ["--samples", "0", "--threads", "1", "--seed", "3", "--experiment", EXPERIMENT]
#: inductor's fused float32 kernels reorder sums (network outputs within 1e-4, tests/test_compile.py);
#: the bound averages T + 1 terms of squared output differences, so it agrees to this relative tolerance
BOUND_RTOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eval-paths") / "checkpoint"
    return save_computing_checkpoint(folder)


def test_compiled_bound_in_process_matches_the_eager_ray_actors(
    train_sandbox, ray_local, fmnist_shards: Path, checkpoint: Path, capsys,
) -> None:
    # the exact bound of 2 images in blocks of 1: every network call has batch 1, the batch the
    # warm-up compiled for, so inductor compiles once (each new batch size would compile again)
    bound = ["--model", str(checkpoint), "--shards", str(fmnist_shards), "--images", "2", "--batch-size", "1",
             *COMMON, "--compile"]
    assert main(bound) == 0
    err = capsys.readouterr().err
    assert "compiling the UNet with torch.compile" in err and "torch.compile failed" not in err, err[-2000:]
    client = MlflowClient(resolve_tracking_uri())
    compiled = latest_run(client, EXPERIMENT)
    # with --workers and no sample grid the network runs only on the actors, which load it eagerly
    assert main([*bound, "--workers", "2"]) == 0
    assert "compiling the UNet" not in capsys.readouterr().err
    actors = latest_run(client, EXPERIMENT)
    assert actors.info.run_id != compiled.info.run_id
    assert compiled.data.tags["eval.method"] == "exact calc_bpd_loop"
    assert actors.data.tags["eval.method"] == "exact calc_bpd_loop over 2 Ray actors"
    assert set(compiled.data.metrics) == set(actors.data.metrics)
    for name in ("eval_bpd", "eval_prior_bpd", "eval_terms_bpd", "eval_decoder_bpd", "eval_bpd_stderr_images"):
        assert compiled.data.metrics[name] == pytest.approx(actors.data.metrics[name], rel=BOUND_RTOL), name


def test_fd_reference_flags_choose_the_reference_and_fail_clearly(
    train_sandbox, ray_local, fmnist_shards: Path, checkpoint: Path, tmp_path: Path, capsys,
) -> None:
    weights = save_stand_in(tmp_path / "inception.pt", dim=16)  # 16-D features: a quick matrix square root
    cache = tmp_path / "cache"
    argv = ["--model", str(checkpoint), "--shards", str(fmnist_shards), "--images", "1", "--estimate", "2",
            "--sample-steps", "2", *COMMON, "--no-compile", "--fd", "4", "--fd-features", "inception",
            "--inception-weights", str(weights), "--fd-reference-split", "val", "--fd-reference-images", "6",
            "--fd-floor-split", "train", "--fd-cache", str(cache), "--fd-workers", "1", "--fd-block", "4"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    run = latest_run(MlflowClient(resolve_tracking_uri()), EXPERIMENT)
    params = run.data.params
    assert (params["fd_reference_split"], params["fd_reference_images"]) == ("val", "6")
    assert (params["fd_floor_split"], params["fd_floor_start"], params["fd_features"]) == ("train", "0", "inception")
    assert run.data.tags["fd.features_identity"].startswith("inception:sha256:")
    assert np.isfinite(run.data.metrics["fd"]) and run.data.metrics["fd_floor"] >= 0
    # the cached statistics are those of exactly the two slices the flags name
    slices = {tuple(json.loads(p.read_text())[k] for k in ("split", "start", "count")) for p in cache.glob("*.json")}
    assert slices == {("val", 0, 6), ("train", 0, 4)}

    # more reference images than the split holds: exit code 2, naming the split and its count
    too_many = [*argv[: argv.index("--fd-reference-images") + 1], "20", *argv[argv.index("--fd-reference-images") + 2 :]]
    assert main(too_many) == 2
    assert "the FD reference needs 20 images of split 'val' (14 there)" in capsys.readouterr().err
    # the floor taken from the reference split: its last N, and the reference stops before them
    reference, floor = reference_and_floor_slices(str(fmnist_shards), 4, "train", "train")
    assert (reference.start, reference.count, floor.start, floor.count) == (0, 62, 62, 4)
    with pytest.raises(ValueError, match=r"needs 63 images of split 'train' \(66 there, 4 of them kept for the floor\)"):
        reference_and_floor_slices(str(fmnist_shards), 4, "train", "train", reference_images=63)
    with pytest.raises(ValueError, match="the FD floor needs 16 held-out real images but split 'val'"):
        reference_and_floor_slices(str(fmnist_shards), 16, "train", "val")
