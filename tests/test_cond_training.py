"""Class-conditional training and evaluation: label dropout, the conditional training step,
the config and data checks, ``--class-label`` / ``--guidance-scale`` of evaluate.py, and (slow, real
Ray) a tiny conditional run through ``launcher.run`` and evaluate.py on its checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from _eval_helpers import save_computing_checkpoint
from _train_helpers import TINY_CONFIG, tiny_config
from mlflow import MlflowClient
from PIL import Image

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.guidance import with_class_labels
from diffusion_core.images import make_grid
from pipelines.data.shards.manifest import Manifest
from pipelines.evaluate import main
from pipelines.evaluation.conditioning import class_accuracy, class_names, resolve_class_labels
from pipelines.evaluation.metrics import class_balanced_labels, class_grid_labels
from pipelines.training.batches import checked_labels
from pipelines.training.config import load_config
from pipelines.training.example_noise import example_label_dropout, example_timesteps_and_noise
from pipelines.training.launcher import check_labels
from pipelines.training.step import train_step
from pipelines.training.trainee import build_trainee
from pipelines.training.worker import Worker

CPU = Worker(rank=0, world_size=1, device=torch.device("cpu"))
COND_EXPERIMENT, COND_MODEL = "ddpm-test-cond", "ddpm-test-cond"


def _config(**overrides):
    base = {"data.shards": "unused", "scaling.torch_threads": 1, "train.global_batch_size": 8,
            "optimizer.warmup_steps": 0}
    return load_config(TINY_CONFIG).replace({**base, **overrides})


def _images(n: int, seed: int = 0, shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- label dropout


def test_label_dropout_drops_the_configured_fraction_reproducibly() -> None:
    x = _images(20000, shape=(1, 4, 4))
    labels = torch.arange(20000) % 10
    dropped = example_label_dropout(x, labels, seed=3, step=7, label_dropout=0.1)
    fraction = float((dropped == -1).float().mean())
    assert abs(fraction - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 20000)  # 4 standard errors
    kept = dropped != -1
    assert torch.equal(dropped[kept], labels[kept])  # kept rows keep their label
    assert torch.equal(example_label_dropout(x, labels, 3, 7, 0.1), dropped)  # same seed and step: same rows
    assert not torch.equal(example_label_dropout(x, labels, 4, 7, 0.1), dropped)  # another seed: other rows
    assert not torch.equal(example_label_dropout(x, labels, 3, 8, 0.1), dropped)  # another step: other rows
    # per image: the same draw whichever worker holds the image, in any order
    halves = torch.cat([example_label_dropout(x[10000:], labels[10000:], 3, 7, 0.1),
                        example_label_dropout(x[:10000], labels[:10000], 3, 7, 0.1)])
    assert torch.equal(torch.cat([halves[10000:], halves[:10000]]), dropped)
    assert torch.equal(example_label_dropout(x, labels, 3, 7, 0.0), labels)
    assert float((example_label_dropout(x, labels, 3, 7, 0.5) == -1).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_unconditional_step_computes_what_it_did_without_labels() -> None:
    """An unconditional config's step: the loss of the per-example timesteps and noise, the
    network called as model(x_t, t), bit for bit (the path without classes)."""
    config = _config()
    trainee = build_trainee(config, CPU, None, prepare=lambda net: net)
    reference = copy.deepcopy(trainee.net)
    x = _images(8)
    diffusion = GaussianDiffusion(config.diffusion)
    losses, t, _ = train_step(trainee, diffusion, x, config, bf16=False)
    t_ref, noise = example_timesteps_and_noise(x, config.train.seed, 1, diffusion.num_timesteps)
    expected = diffusion.training_losses(reference, x, t_ref, noise=noise)["loss"]
    assert torch.equal(t, t_ref) and torch.equal(losses, expected.detach().float())


def test_conditional_step_trains_on_labels_with_dropout() -> None:
    config = _config(**{"model.num_classes": 10, "train.label_dropout": 0.5})
    trainee = build_trainee(config, CPU, None, prepare=lambda net: net)
    x, labels = _images(8), torch.arange(8)
    diffusion = GaussianDiffusion(config.diffusion)
    for _ in range(2):  # the zero-initialized output convolutions pass no gradient to the embedding before
        train_step(trainee, diffusion, x, config, bf16=False, class_labels=labels)
    reference = copy.deepcopy(trainee.net)
    losses, t, _ = train_step(trainee, diffusion, x, config, bf16=False, class_labels=labels)
    t_ref, noise = example_timesteps_and_noise(x, config.train.seed, 3, diffusion.num_timesteps)
    dropped = example_label_dropout(x, labels, config.train.seed, 3, 0.5)
    assert 0 < int((dropped == -1).sum()) < 8
    with torch.no_grad():
        expected = diffusion.training_losses(with_class_labels(reference, dropped), x, t_ref, noise=noise)["loss"]
        unlabelled = diffusion.training_losses(with_class_labels(reference, torch.full_like(labels, -1)), x, t_ref,
                                               noise=noise)["loss"]
    assert torch.equal(t, t_ref) and torch.allclose(losses, expected.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(losses, unlabelled.float(), rtol=1e-6, atol=0)  # the labels reach the network


# ----------------------------------------------------------------------------- config and data checks


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.label_dropout": 1.0}, "train.label_dropout"),
    ({"train.label_dropout": -0.1}, "train.label_dropout"),
    ({"train.label_dropout": "often"}, "train.label_dropout"),
    ({"model.num_classes": 10, "train.sample_guidance_scale": -1.0}, "train.sample_guidance_scale"),
    ({"model.num_classes": 10, "train.sample_guidance_scale": float("nan")}, "train.sample_guidance_scale"),
    ({"train.sample_guidance_scale": 2.0}, "model.num_classes"),
    ({"model.num_classes": 0}, "num_classes"),
])
def test_bad_conditional_settings_name_the_key(overrides, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        _config(**overrides)


def test_the_cond_config_is_the_fashion_mnist_config_with_classes() -> None:
    root = TINY_CONFIG.parent
    plain, cond = load_config(root / "fashion_mnist.yaml"), load_config(root / "fashion_mnist_cond.yaml")
    assert cond.model.num_classes == 10 and cond.train.label_dropout == 0.1
    assert cond.model.to_dict() == {**plain.model.to_dict(), "num_classes": 10}
    for section in ("diffusion", "optimizer", "data", "scaling"):
        assert getattr(cond, section) == getattr(plain, section)
    assert cond.train == plain.train  # label_dropout 0.1 and guidance 1.0 are the defaults


def _manifest(has_labels: bool, classes: tuple[str, ...] = ()) -> Manifest:
    return Manifest(schema_version=2, image_shape=(1, 28, 28), counts={"train": 80, "val": 10, "test": 0},
                    has_labels=has_labels, normalization={}, source="s", command="c", source_checksum="x",
                    rejected=(), created_at="t", classes=classes)


def test_a_conditional_model_needs_labelled_shards_with_at_most_its_classes() -> None:
    config = _config(**{"model.num_classes": 3})
    with pytest.raises(ValueError, match="unlabelled.*model.num_classes=null"):
        check_labels(config, _manifest(False))
    with pytest.raises(ValueError, match=r"4 classes.*model\.num_classes=3"):
        check_labels(config, _manifest(True, ("a", "b", "c", "d")))
    check_labels(config, _manifest(True, ("a", "b", "c")))
    check_labels(config, _manifest(True))  # IDX shards name no classes: labels checked per batch
    check_labels(_config(), _manifest(False))  # unconditional: labels do not matter
    with pytest.raises(ValueError, match=r"outside \[0, model\.num_classes=3\)"):
        checked_labels(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="unlabelled row holds -1"):
        checked_labels(torch.tensor([-1, 1]), 3)


# ----------------------------------------------------------------------------- evaluation helpers


def test_class_labels_resolve_from_indices_names_or_all() -> None:
    names = class_names(("T-shirt/top", "Trouser", "Sandal"), 3)
    assert resolve_class_labels(None, 3, names) == (0, 1, 2)
    assert resolve_class_labels(["all"], 3, names) == (0, 1, 2)
    assert resolve_class_labels(["Sandal", "0", "sandal"], 3, names) == (2, 0)
    assert class_names((), 3) == ("0", "1", "2")
    assert resolve_class_labels(None, None) is None
    for tokens, message in ((["3"], "0..2"), (["Boot"], "not a class"), (["all", "1"], "cannot be combined")):
        with pytest.raises(ValueError, match="--class-label"):
            resolve_class_labels(tokens, 3, names)
        with pytest.raises(ValueError, match=message):
            resolve_class_labels(tokens, 3, names)
    with pytest.raises(ValueError, match="--class-label 1: this model is unconditional"):
        resolve_class_labels(["1"], None)


def test_class_accuracy_and_balanced_labels() -> None:
    assert class_balanced_labels(5, (3, 7), start=1).tolist() == [7, 3, 7, 3, 7]
    assert class_grid_labels((2, 0), 3).tolist() == [2, 2, 2, 0, 0, 0]
    out = class_accuracy(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), (0, 1, 2))
    assert out == {"sample_class_accuracy": 0.75, "sample_class_accuracy_0": 0.5, "sample_class_accuracy_1": 1.0}


def test_class_label_for_an_unconditional_model_exits_2_naming_the_flag(tmp_path: Path, capsys) -> None:
    folder = save_computing_checkpoint(tmp_path / "model")
    common = ["--model", str(folder), "--shards", str(tmp_path / "no-shards"), "--no-compile"]
    assert main([*common, "--class-label", "3"]) == 2
    assert "--class-label 3: this model is unconditional" in capsys.readouterr().err
    assert main([*common, "--guidance-scale", "2"]) == 2
    assert "--guidance-scale 2: this model is unconditional" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--guidance-scale", "-1"])
    assert "--guidance-scale" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real Ray (slow)


@pytest.fixture(scope="module")
def cond_run(ray_local, fmnist_shards: Path, train_sandbox: Path):
    """A 2-step class-conditional run of configs/tiny_cpu.yaml (10 classes, label dropout 0.1), one
    worker, with a grid and both bounds at step 2. Returns ``(config, outcome)``."""
    from pipelines.training.launcher import run

    config = tiny_config(fmnist_shards, train_sandbox / "runs", "cond-1", model__num_classes=10,
                         train__total_steps=2, scaling__num_workers=1,
                         tracking__experiment_name=COND_EXPERIMENT, tracking__registered_model_name=COND_MODEL)
    return config, run(config)


@pytest.mark.slow
def test_conditional_training_run_makes_a_labelled_model_and_a_grid_per_class(cond_run) -> None:
    config, outcome = cond_run
    loaded = load_checkpoint(outcome["checkpoint"])
    assert loaded.unet_config.num_classes == 10
    x, t = torch.zeros(2, 1, 28, 28), torch.tensor([5, 5])
    with torch.no_grad():
        cat, uncond = loaded.model(x, t, torch.tensor([0, 9])), loaded.model(x, t, torch.tensor([-1, -1]))
    assert cat.shape == (2, 1, 28, 28) and not torch.equal(cat, uncond)  # the label changes the output
    client = MlflowClient(outcome["tracking_uri"])
    run = client.get_run(outcome["mlflow_run_id"])
    assert run.data.params["model.num_classes"] == "10" and run.data.params["train.label_dropout"] == "0.1"
    metrics = run.data.metrics
    assert {"val_bpd", "val_bpd_cond", "val_bpd_exact", "val_bpd_exact_cond"} <= set(metrics)
    grid_path = client.download_artifacts(run.info.run_id, "samples/step_00000002.png")
    per_class = -(-config.train.sample_images // 10)
    expected = make_grid(torch.zeros(10 * per_class, 1, 28, 28), nrow=per_class).shape[:2]
    assert np.asarray(Image.open(grid_path)).shape[:2] == expected  # 10 rows, one per class


@pytest.mark.slow
def test_evaluate_reports_both_bounds_and_class_accuracy(cond_run, fmnist_shards: Path,
                                                         fd_classifier_folder: Path, capsys) -> None:
    _, outcome = cond_run
    assert main(["--model", outcome["checkpoint"], "--shards", str(fmnist_shards), "--images", "4",
                 "--estimate", "4", "--samples", "4", "--sample-steps", "2", "--seed", "1", "--threads", "1",
                 "--no-compile", "--experiment", COND_EXPERIMENT, "--class-label", "0", "Trouser", "--guidance-scale",
                 "2", "--fd", "10", "--fd-classifier", str(fd_classifier_folder), "--fd-workers", "1",
                 "--fd-block", "5"]) == 2  # the IDX test shards name no classes: "Trouser" is unknown
    assert "--class-label 'Trouser' is not a class of this model" in capsys.readouterr().err
    assert main(["--model", outcome["checkpoint"], "--shards", str(fmnist_shards), "--images", "4",
                 "--estimate", "4", "--samples", "4", "--sample-steps", "2", "--seed", "1", "--threads", "1",
                 "--no-compile", "--experiment", COND_EXPERIMENT, "--class-label", "0", "1", "--guidance-scale",
                 "2", "--fd", "10", "--fd-classifier", str(fd_classifier_folder), "--fd-workers", "1",
                 "--fd-block", "5"]) == 0
    printed = capsys.readouterr().out
    assert "without a label (-log p(x))" in printed and "with the true labels (-log p(x|y))" in printed
    assert "class accuracy of the samples:" in printed
    client = MlflowClient(outcome["tracking_uri"])
    experiment = client.get_experiment_by_name(COND_EXPERIMENT)
    run = client.search_runs([experiment.experiment_id], filter_string="tags.`eval.model_uri` != ''",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    metrics, params = run.data.metrics, run.data.params
    assert {"eval_bpd_estimate", "eval_bpd_estimate_cond", "fd", "sample_class_accuracy",
            "sample_class_accuracy_0", "sample_class_accuracy_1"} <= set(metrics)
    assert 0.0 <= metrics["sample_class_accuracy"] <= 1.0
    assert (params["class_labels"], params["guidance_scale"]) == ("0,1", "2.0")
    assert params["sample_guided_network_evaluations"] == str(2 * int(params["sample_network_evaluations"]))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/samples.png", "eval/bpd_per_timestep_estimate_cond.png"} <= artifacts
