"""Class-conditional training and evaluation: label dropout, the conditional training step,
the config and data checks, ``--class-label`` / ``--guidance-scale`` / ``--guidance-interval`` of
evaluate.py (the interval against ``generate`` with it and against the evaluations the network is
handed), and (slow, real Ray) a tiny conditional run through ``launcher.run`` and evaluate.py on its
checkpoint, and evaluate.py's grid and Ray-drawn FD samples with a guidance interval."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _class_gaussians import ExactClassGaussians
from _eval_helpers import UNET_28, latest_run, save_computing_checkpoint
from _inception_standin import save_stand_in
from _train_helpers import TINY_CONFIG, tiny_config
from _unet_helpers import computing_unet
from mlflow import MlflowClient
from PIL import Image

from diffusion_core.checkpoint import load_checkpoint, save_checkpoint
from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.generate import SamplerSettings, generate, seeded_generator
from diffusion_core.guidance import with_class_labels
from diffusion_core.images import encode_png, make_grid
from pipelines.data.shards.manifest import Manifest
from pipelines.evaluate import main, parse_args, settings_from_args
from pipelines.evaluation.blocks import block_range, block_seed, num_blocks
from pipelines.evaluation.conditioning import class_accuracy, class_names, resolve_class_labels
from pipelines.evaluation.distributed_sampling import sample_locally
from pipelines.evaluation.fd import StatsCache, images_fd, reference_and_floor_slices, slice_stats
from pipelines.evaluation.features import build_feature_net
from pipelines.evaluation.job import EvalSettings, guidance_params
from pipelines.evaluation.metrics import class_balanced_labels, class_grid_labels, sample_grid
from pipelines.registry.tracking_uri import resolve_tracking_uri
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
    assert main([*common, "--guidance-scale", "2", "--guidance-interval", "0.5", "inf"]) == 2
    assert "--guidance-scale 2 --guidance-interval 0.5 inf: this model is unconditional" in capsys.readouterr().err


# ----------------------------------------------------------------------------- guidance interval

ARGS = ["--model", "m", "--shards", "s"]
#: T = 200 (linear schedule): sigma_t = sqrt(1 / abar_t - 1) runs from 0.03 to 157, so (0.5, 2.0]
#: guides some of a 12-step DDIM chain's timesteps and leaves others to the conditional model
INTERVAL = (0.5, 2.0)


def _gaussians() -> tuple[GaussianDiffusion, ExactClassGaussians]:
    diffusion = GaussianDiffusion(DiffusionConfig(num_timesteps=200))
    return diffusion, ExactClassGaussians(diffusion)


def test_guidance_interval_flag_reaches_the_settings() -> None:
    assert settings_from_args(parse_args(ARGS)).guidance_interval is None
    settings = settings_from_args(parse_args([*ARGS, "--guidance-scale", "3", "--guidance-interval", "0.28", "inf"]))
    assert settings.guidance_interval == (0.28, math.inf) and settings.guidance_scale == 3.0


@pytest.mark.parametrize(("values", "message"), [
    (["2", "1"], "--guidance-interval 2 1: must be LO HI with 0 <= LO < HI"),
    (["1", "1"], "--guidance-interval 1 1: must be LO HI with 0 <= LO < HI"),
    (["-0.5", "1"], "--guidance-interval -0.5 1: must be LO HI with 0 <= LO < HI"),
    (["nan", "1"], "--guidance-interval nan 1: must be LO HI"),
    (["0", "nan"], "--guidance-interval 0 nan: must be LO HI"),
    (["inf", "inf"], "--guidance-interval inf inf: must be LO HI"),
    (["0.5"], "argument --guidance-interval: expected 2 arguments"),
    (["low", "1"], "argument --guidance-interval: invalid float value: 'low'"),
])
def test_bad_guidance_interval_exits_2_naming_the_flag(values: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args([*ARGS, "--guidance-scale", "3", "--guidance-interval", *values])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("scale", [[], ["--guidance-scale", "1"], ["--guidance-scale", "0"]])
def test_guidance_interval_without_a_guiding_scale_exits_2(scale: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args([*ARGS, *scale, "--guidance-interval", "0.5", "2"])
    assert info.value.code == 2
    assert "--guidance-interval 0.5 2 needs --guidance-scale S other than 0 and 1" in capsys.readouterr().err


@pytest.mark.parametrize("interval", [(2.0, 1.0), (-0.1, 1.0), (math.inf, math.inf), (0.1, math.nan), (0.1,),
                                      (0.1, 0.2, 0.3), "ab", (True, 2.0)])
def test_eval_settings_refuse_a_bad_guidance_interval(interval) -> None:
    with pytest.raises(ValueError, match="guidance_interval"):
        EvalSettings(model="m", shards="s", guidance_scale=3.0, guidance_interval=interval)


def test_eval_settings_guidance_interval_needs_a_guiding_scale() -> None:
    for scale in (0.0, 1.0):
        with pytest.raises(ValueError, match="guidance_interval=.* needs a guidance_scale other than 0 and 1"):
            EvalSettings(model="m", shards="s", guidance_scale=scale, guidance_interval=(0.5, 2.0))
    settings = EvalSettings(model="m", shards="s", guidance_scale=3.0, guidance_interval=[0, math.inf])
    assert settings.guidance_interval == (0.0, math.inf) and isinstance(settings.guidance_interval, tuple)


def test_guidance_params_count_the_evaluations_the_network_is_handed() -> None:
    """Oracle: the batch sizes the exact two-class network sees in a real guided draw of 2 images
    (a doubled batch counts 2 per image): fewer with the interval than 2 per step."""
    diffusion, model = _gaussians()
    settings = SamplerSettings("ddim", 12)
    generate(diffusion, model, (2, 1, 4, 4), settings, seeded_generator(0), class_labels=[0, 1], guidance_scale=3.0,
             guidance_interval=INTERVAL)
    seen = sum(model.batch_sizes) // 2
    args = EvalSettings(model="m", shards="s", sampling=settings, guidance_scale=3.0, guidance_interval=INTERVAL)
    assert guidance_params(args, (0, 1), diffusion) == {
        "class_labels": "0,1", "guidance_scale": 3.0, "guidance_interval": "0.5,2.0",
        "sample_guided_network_evaluations": seen}
    assert 12 < seen < 24
    everywhere = guidance_params(dataclasses.replace(args, guidance_interval=None), (0, 1), diffusion)
    assert (everywhere["guidance_interval"], everywhere["sample_guided_network_evaluations"]) == ("none", 24)
    inf = guidance_params(dataclasses.replace(args, guidance_interval=(0.28, math.inf)), (0, 1), diffusion)
    assert inf["guidance_interval"] == "0.28,inf"


def test_sample_grid_is_generate_with_the_guidance_interval() -> None:
    diffusion, model = _gaussians()
    settings, labels = SamplerSettings("ddim", 12), class_grid_labels((0, 1), 3)

    def draw(**interval) -> torch.Tensor:
        return generate(diffusion, model, (6, 1, 4, 4), settings, seeded_generator(5), class_labels=labels,
                        guidance_scale=3.0, **interval)

    images, png = sample_grid(diffusion, model, (1, 4, 4), 6, settings, seed=5, class_labels=labels,
                              guidance_scale=3.0, guidance_interval=INTERVAL, nrow=3)
    expected = draw(guidance_interval=INTERVAL)
    assert torch.equal(images, expected) and png == encode_png(make_grid(expected, nrow=3))
    assert (images - draw()).abs().max() > 1e-3  # guiding every step draws other images
    with pytest.raises(ValueError, match="guidance_interval"):
        sample_grid(diffusion, model, (1, 4, 4), 6, settings, seed=5, class_labels=labels, guidance_scale=3.0,
                    guidance_interval=(2.0, 0.5))


COND_UNET_8 = UNetConfig(image_size=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,),
                         num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_groups=4, num_classes=3)


def test_fd_samples_of_one_process_take_the_guidance_interval(tmp_path: Path) -> None:
    """Oracle: ``generate`` with the interval on each seeded block of class-balanced labels
    (T = 24: sigma_t runs from 0.07 to 2624; a 6-step DDIM chain visits t = 23, 18, 14, 9, 5, 0, and
    (0.5, 20] guides t = 14, 9, 5)."""
    diffusion = DiffusionConfig(num_timesteps=24)
    folder = save_checkpoint(tmp_path / "ckpt", computing_unet(COND_UNET_8).state_dict(), COND_UNET_8, diffusion)
    settings, interval, classes = SamplerSettings("ddim", 6), (0.5, 20.0), (0, 2)
    got = sample_locally(folder, settings, 5, 2, seed=4, classes=classes, guidance_scale=3.0,
                         guidance_interval=interval)
    loaded = load_checkpoint(folder)
    blocks = []
    for block in range(num_blocks(5, 2)):
        start, count = block_range(block, 2, 5)
        blocks.append(generate(loaded.diffusion, loaded.model, (count, 1, 8, 8), settings,
                               torch.Generator().manual_seed(block_seed(4, block)),
                               class_labels=class_balanced_labels(count, classes, start), guidance_scale=3.0,
                               guidance_interval=interval).numpy())
    np.testing.assert_array_equal(got, np.concatenate(blocks))
    everywhere = sample_locally(folder, settings, 5, 2, seed=4, classes=classes, guidance_scale=3.0)
    assert np.abs(got - everywhere).max() > 1e-4


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


@pytest.mark.slow
def test_evaluate_guides_the_grid_and_the_ray_fd_samples_only_in_the_interval(
    train_sandbox, ray_local, fmnist_shards: Path, tmp_path: Path, capsys,
) -> None:
    """evaluate.py --guidance-interval end to end on a 10-class ``computing_unet`` (T = 24, 6 DDIM
    steps, (0.5, 20] guides 3 of them). Oracles: the logged grid is ``generate`` with the interval; the
    FD (samples drawn by a Ray actor) is that of ``sample_locally`` with the interval (the actors draw
    the same images bit for bit, tests/test_fd_ray.py) against the cached reference; the counted
    evaluations are the batch sizes the network is handed in a real guided draw of one image."""
    experiment = "ddpm-test-guidance-interval"
    config = dataclasses.replace(UNET_28, num_classes=10)
    folder = save_checkpoint(tmp_path / "cond", computing_unet(config).state_dict(), config,
                             DiffusionConfig(num_timesteps=24))
    weights = save_stand_in(tmp_path / "inception.pt", dim=16)
    cache = tmp_path / "cache"
    interval, settings = (0.5, 20.0), SamplerSettings("ddim", 6)
    assert main(["--model", str(folder), "--shards", str(fmnist_shards), "--images", "1", "--estimate", "2",
                 "--samples", "4", "--sample-steps", "6", "--seed", "3", "--threads", "1", "--no-compile",
                 "--experiment", experiment, "--class-label", "0", "1", "--guidance-scale", "3",
                 "--guidance-interval", "0.5", "20", "--fd", "4", "--fd-features", "inception",
                 "--inception-weights", str(weights), "--fd-reference-split", "val", "--fd-reference-images", "6",
                 "--fd-floor-split", "train", "--fd-cache", str(cache), "--fd-workers", "1",
                 "--fd-block", "2"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    client = MlflowClient(resolve_tracking_uri())
    run = latest_run(client, experiment)
    params, loaded = run.data.params, load_checkpoint(folder)

    seen: list[int] = []

    def recording(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(x_t.shape[0])
        return loaded.model(x_t, t, y)

    generate(loaded.diffusion, recording, (1, 1, 28, 28), settings, seeded_generator(0), class_labels=[0],
             guidance_scale=3.0, guidance_interval=interval)
    assert (params["guidance_scale"], params["guidance_interval"]) == ("3.0", "0.5,20.0")
    assert params["sample_guided_network_evaluations"] == str(sum(seen)) == "9"  # 3 guided steps of 6
    assert params["sample_network_evaluations"] == "6"  # fully guided: 12

    labels = class_grid_labels((0, 1), 2)
    grid = generate(loaded.diffusion, loaded.model, (4, 1, 28, 28), settings, seeded_generator(3),
                    class_labels=labels, guidance_scale=3.0, guidance_interval=interval)
    everywhere = generate(loaded.diffusion, loaded.model, (4, 1, 28, 28), settings, seeded_generator(3),
                          class_labels=labels, guidance_scale=3.0)
    assert (grid - everywhere).abs().max() > 1e-3
    logged = np.asarray(Image.open(client.download_artifacts(run.info.run_id, "eval/samples.png")))
    assert np.array_equal(logged, np.asarray(Image.open(io.BytesIO(encode_png(make_grid(grid, nrow=2))))))

    net = build_feature_net("inception", inception_weights=str(weights))
    reference, _ = reference_and_floor_slices(str(fmnist_shards), 4, "val", "train", 6)
    reference_stats, hit = slice_stats(reference, net, StatsCache(cache))
    assert hit  # the statistics the evaluation cached

    def fd(**interval_kwarg) -> float:
        samples = sample_locally(folder, settings, 4, 2, seed=3, classes=(0, 1), guidance_scale=3.0, **interval_kwarg)
        return images_fd(net, samples, reference_stats)

    assert run.data.metrics["fd"] == pytest.approx(fd(guidance_interval=interval), rel=1e-9)
    assert run.data.metrics["fd"] != pytest.approx(fd(), rel=1e-6)  # guiding every step: other samples
