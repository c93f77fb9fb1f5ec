"""Class-conditional serving without Ray Serve (fast): class names and labels resolved against the model,
classifier-free guidance jobs, their batching (grouped by guidance scale, labels per row), their cost,
the conditional bound, and the inference network's third input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from _diffusion_helpers import single_thread  # noqa: F401 (autouse fixture)
from _unet_helpers import computing_unet

from deploy.errors import RequestError
from deploy.http_io import parse_json_model
from deploy.model_runner import LikelihoodJob, ModelRunner, SampleJob
from deploy.request_models import LikelihoodOptions, SampleRequest
from diffusion_core import DiffusionConfig, GaussianDiffusion, UNet, UNetConfig
from diffusion_core.checkpoint import LoadedModel
from diffusion_core.generate import generate, guided_network_evaluations
from diffusion_core.guidance import with_class_labels
from diffusion_core.images import uint8_to_float
from diffusion_core.inference_network import CHECK_TOLERANCE, PaddedNetwork, build_inference_network
from pipelines.registry.class_labels import describe_classes, model_class_names, resolve_class_labels
from pipelines.registry.model_identity import ModelIdentity

COND_UNET = UNetConfig(image_size=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2),
                       num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, num_groups=4, num_classes=3)
UNCOND_UNET = UNetConfig(image_size=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, num_groups=4)
DIFFUSION = DiffusionConfig(num_timesteps=24)
NAMES = ["Top", "Sandal", "Bag"]
#: batched vs alone: the same float32 network on batches of other sizes (kernels may sum in another order)
RTOL, ATOL = 1e-5, 1e-5




def _runner(config: UNetConfig, metadata: dict | None = None, manifest: dict | None = None) -> ModelRunner:
    model = computing_unet(config, seed=0)
    return ModelRunner(LoadedModel(model, GaussianDiffusion(DIFFUSION), config, DIFFUSION, metadata or {}),
                       ModelIdentity(uri="mem"), manifest, network="eager")


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    """An eager runner on a class-conditional UNet (K = 3) named by its checkpoint metadata."""
    return _runner(COND_UNET, {"class_names": NAMES})


@pytest.fixture(scope="module")
def unconditional() -> ModelRunner:
    return _runner(UNCOND_UNET)


def _error(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value


def _request(body: str) -> SampleRequest:
    return parse_json_model(SampleRequest, body.encode())


class _CountCalls:
    """Wraps ``runner.network`` to record the batch size and the labels of every network evaluation."""

    def __init__(self, runner: ModelRunner) -> None:
        self.sizes: list[int] = []
        self._runner, self._network = runner, runner.network

        def counted(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
            self.sizes.append(x.shape[0])
            return self._network(x, t, class_labels)

        runner.network = counted

    def __enter__(self) -> "_CountCalls":
        return self

    def __exit__(self, *exc: object) -> None:
        self._runner.network = self._network


# ---------------------------------------------------------------- class names and labels


def test_class_names_come_from_the_metadata_else_the_manifest() -> None:
    manifest = {"classes": ["a", "b", "c"]}
    assert model_class_names(3, {"class_names": NAMES}, manifest) == tuple(NAMES)
    assert model_class_names(3, {}, manifest) == ("a", "b", "c")
    assert model_class_names(3, {}, {"classes": []}) is None  # IDX shards without --class-names: indices only
    assert model_class_names(3, {}, {"classes": ["a", "b"]}) is None  # not the model's K classes
    assert model_class_names(None, {"class_names": NAMES}, manifest) is None
    with pytest.raises(ValueError, match="3 distinct non-empty names"):
        model_class_names(3, {"class_names": ["a", "a", "b"]}, None)
    assert describe_classes(2, ("x", "y")) == [{"index": 0, "name": "x"}, {"index": 1, "name": "y"}]
    assert describe_classes(2, None) == [{"index": 0, "name": None}, {"index": 1, "name": None}]
    assert describe_classes(None, None) is None


def test_labels_resolve_to_indices_or_name_the_problem() -> None:
    names = tuple(NAMES)
    assert resolve_class_labels(None, 2, 3, names) is None
    assert resolve_class_labels("Sandal", 2, 3, names) == [1, 1]
    assert resolve_class_labels("sandal", 1, 3, names) == [1]  # case-insensitive when unique
    assert resolve_class_labels([2, "Top", None], 3, 3, names) == [2, 0, -1]
    assert resolve_class_labels(2, 1, 3, None) == [2]
    cases = [
        (("Sneaker", 1, 3, names), "'Sneaker' is not a class of this model; its classes are 0='Top', 1='Sandal', 2='Bag'"),
        ((3, 1, 3, names), "class index 3 is out of range; this model's classes are 0..2"),
        (([0, 5], 2, 3, names), "entry 1: class index 5 is out of range"),
        (([0], 2, 3, names), "1 labels for 2 images"),
        (("Sandal", 1, 3, None), "this model carries no class names; give a class index 0..2"),
        ((0, 1, None, None), "this model is unconditional"),
        ((-1, 1, 3, names), "negative"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            resolve_class_labels(*args)


# ---------------------------------------------------------------- jobs against the model


def test_sample_job_resolves_labels_and_counts_guidance(runner: ModelRunner) -> None:
    guided = runner.make_sample_job(_request('{"num_images": 2, "class_label": "Bag", "guidance_scale": 2, '
                                             '"num_steps": 5}'), 1, 100)
    assert (guided.class_labels, guided.guidance_scale) == ((2, 2), 2.0)
    assert guided.network_evaluations(runner.loaded.diffusion) == 10  # the doubled batch: 2 per image per step
    plain = runner.make_sample_job(_request('{"num_images": 2, "class_label": [1, null], "num_steps": 5}'), 1, 100)
    assert (plain.class_labels, plain.guidance_scale, plain.network_evaluations(runner.loaded.diffusion)) == \
        ((1, -1), 1.0, 5)
    # scale 0 and no labels are the unconditional model at scale 1: one evaluation, batched with unguided jobs
    for body in ('{"class_label": 1, "guidance_scale": 0}', '{"guidance_scale": 3}', '{"class_label": [null]}'):
        job = runner.make_sample_job(_request(body), 1, 100)
        assert (job.class_labels, job.guidance_scale) == (None, 1.0), body
    err = _error(runner.make_sample_job, _request('{"class_label": "Bag", "guidance_scale": 2, "num_steps": 6}'), 1, 11)
    assert (err.status, err.field) == (413, "num_steps") and "12 network evaluations" in err.message
    for body, message in [('{"class_label": "Sneaker"}', "not a class of this model"),
                          ('{"class_label": 3}', "out of range"),
                          ('{"class_label": [0, 9], "num_images": 2}', "entry 1")]:
        err = _error(runner.make_sample_job, _request(body), 1, 100)
        assert (err.status, err.field) == (422, "class_label") and message in err.message, body
        assert err.body()["error"].startswith("class_label: ")


def test_sample_job_takes_a_guidance_interval_only_where_it_acts(runner: ModelRunner) -> None:
    """Oracle: ``guided_network_evaluations`` (tested against the network's own calls in
    tests/test_guidance.py); the interval is dropped where nothing is guided (s = 1, s = 0, no labels),
    so those jobs batch with the unguided ones."""
    diffusion = runner.loaded.diffusion
    body = '{"num_images": 2, "class_label": "Bag", "guidance_scale": 2, "num_steps": 8, "guidance_interval": [%s]}'
    bounded = runner.make_sample_job(_request(body % "0.5, 2"), 1, 100)
    open_ended = runner.make_sample_job(_request(body % "0.5, null"), 1, 100)
    assert (bounded.guidance_interval, open_ended.guidance_interval) == ((0.5, 2.0), (0.5, math.inf))
    for job in (bounded, open_ended):
        want = guided_network_evaluations(diffusion, job.sampler_settings, 2.0, job.guidance_interval)
        assert job.network_evaluations(diffusion) == want and 8 < want < 16
    assert bounded.group != open_ended.group != runner.make_sample_job(_request(body % "0, null"), 1, 100).group
    for unguided in ('"class_label": "Bag", "guidance_scale": 1', '"class_label": "Bag", "guidance_scale": 0',
                     '"guidance_scale": 2'):
        job = runner.make_sample_job(_request('{%s, "guidance_interval": [0.5, 2]}' % unguided), 1, 100)
        assert job.guidance_interval is None and job.guidance_scale == 1.0, unguided


def test_unconditional_model_refuses_labels_and_guidance(unconditional: ModelRunner) -> None:
    err = _error(unconditional.make_sample_job, _request('{"class_label": 0}'), 1, 100)
    assert (err.status, err.field) == (422, "class_label") and "unconditional" in err.message
    err = _error(unconditional.make_sample_job, _request('{"guidance_scale": 2}'), 1, 100)
    assert (err.status, err.field) == (422, "guidance_scale") and "unconditional" in err.message
    assert unconditional.make_sample_job(_request('{"guidance_scale": 1}'), 1, 100).class_labels is None
    err = _error(unconditional.make_sample_job, _request('{"guidance_interval": [0.5, 2]}'), 1, 100)
    assert (err.status, err.field) == (422, "guidance_interval") and "unconditional" in err.message
    pixels = np.zeros((1, 8, 8, 1), np.uint8)
    err = _error(unconditional.make_likelihood_job, LikelihoodOptions(class_label=1), pixels, 0, "pixels", 100)
    assert (err.status, err.field) == (422, "class_label")
    info = unconditional.describe()
    assert (info["num_classes"], info["classes"]) == (None, None)


def test_model_description_lists_the_classes(runner: ModelRunner) -> None:
    info = runner.describe()
    assert info["num_classes"] == 3
    assert info["classes"] == [{"index": 0, "name": "Top"}, {"index": 1, "name": "Sandal"}, {"index": 2, "name": "Bag"}]
    unnamed = _runner(COND_UNET, manifest={"counts": {"train": 1}, "classes": []})
    assert [c["name"] for c in unnamed.describe()["classes"]] == [None, None, None]
    err = _error(unnamed.make_sample_job, _request('{"class_label": "Bag"}'), 1, 100)
    assert err.field == "class_label" and "carries no class names" in err.message


# ---------------------------------------------------------------- batching


def _alone(runner: ModelRunner, job: SampleJob) -> torch.Tensor:
    """``generate`` on the eager UNet for ``job`` alone, with its labels and scale."""
    with torch.no_grad():
        return generate(runner.loaded.diffusion, runner.loaded.model, (job.num_images, *runner.image_shape),
                        job.sampler_settings, torch.Generator().manual_seed(job.seed),
                        class_labels=None if job.class_labels is None else list(job.class_labels),
                        guidance_scale=job.guidance_scale, guidance_interval=job.guidance_interval)


def test_guided_and_unguided_jobs_batch_by_scale_and_equal_each_job_alone(runner: ModelRunner) -> None:
    jobs = [
        SampleJob(2, "ddim", 4, 0.0, 11, True, class_labels=(0, 1), guidance_scale=2.0),
        SampleJob(1, "ddim", 4, 0.0, 12, True, class_labels=(2,)),  # unguided (s = 1)
        SampleJob(2, "ddim", 4, 0.0, 13, True),  # no labels: with the unguided job
        SampleJob(1, "ddim", 4, 0.0, 14, True, class_labels=(1,), guidance_scale=2.0),
        SampleJob(1, "ddim", 4, 0.0, 15, True, class_labels=(1,), guidance_scale=4.0),
        SampleJob(1, "ddim", 4, 0.0, 16, True, class_labels=(0,), guidance_scale=2.0, guidance_interval=(1.0, math.inf)),
    ]
    with _CountCalls(runner) as calls:
        results = runner.sample_many(jobs)
    for job, result in zip(jobs, results):
        assert isinstance(result, torch.Tensor), result
        torch.testing.assert_close(result, _alone(runner, job), rtol=RTOL, atol=ATOL)
    # s = 2: 3 images on the doubled batch (6); s = 1: 3 images (1 labelled, 2 not); s = 4: 1 image doubled (2);
    # s = 2 guided for sigma_t > 1 only: 1 image, doubled at the steps inside, alone at the others
    inside = guided_network_evaluations(runner.loaded.diffusion, jobs[-1].sampler_settings, 2.0, (1.0, math.inf)) - 4
    assert 0 < inside < 4
    assert sorted(calls.sizes) == sorted([6] * 4 + [3] * 4 + [2] * 4 + [2] * inside + [1] * (4 - inside))
    interval_free = runner.sample_many([dataclasses.replace(jobs[-1], guidance_interval=None)])[0]
    assert (results[-1] - interval_free).abs().max() > 1e-3  # the interval acts
    # the guidance acts: the same seed and label at s = 1, 2 and 4 gives three different images
    unguided = runner.sample_many([SampleJob(1, "ddim", 4, 0.0, 14, True, class_labels=(1,))])[0]
    assert (results[3] - unguided).abs().max() > 1e-3 and (results[4] - results[3]).abs().max() > 1e-3
    # and so does the label
    other = runner.sample_many([SampleJob(1, "ddim", 4, 0.0, 14, True, class_labels=(2,), guidance_scale=2.0)])[0]
    assert (other - results[3]).abs().max() > 1e-3


def test_conditional_bound_batches_labelled_and_unlabelled_rows(runner: ModelRunner) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    labelled = runner.make_likelihood_job(LikelihoodOptions(class_label=["Bag", None]), images[:2], 5, "pixels", 100)
    assert labelled.class_labels == (2, -1)
    plain = LikelihoodJob(images[2:], "estimate", 16, 6, False)
    with _CountCalls(runner) as calls:
        results = runner.likelihood_many([labelled, plain])
    assert sorted(calls.sizes) == [3] * 16  # one batch: the labels travel per row
    for job, rows in zip((labelled, plain), results):
        x = torch.from_numpy(uint8_to_float(job.pixels).transpose(0, 3, 1, 2).copy())
        labels = list(job.class_labels) if job.class_labels else [-1] * len(x)
        reference = runner.loaded.diffusion.calc_bpd_estimate(with_class_labels(runner.loaded.model, labels), x,
                                                              num_samples=16,
                                                              generator=torch.Generator().manual_seed(job.seed))
        np.testing.assert_allclose([r["bpd"] for r in rows], reference["total_bpd"].numpy(), rtol=1e-5)
    unconditioned = runner.likelihood_many([LikelihoodJob(images[:1], "estimate", 16, 5, False)])[0]
    assert abs(unconditioned[0]["bpd"] - results[0][0]["bpd"]) > 1e-4  # label 2 changes the bound


# ---------------------------------------------------------------- the network's third input


def test_padded_network_pads_labels_with_no_label_rows() -> None:
    model = computing_unet(COND_UNET, seed=0)
    padded = PaddedNetwork(model, buckets=(2, 4))
    x, t = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3, 23, 7, 7])
    y = torch.tensor([-1, 0, 1, 2, 1])
    with torch.no_grad():
        torch.testing.assert_close(padded(x, t, y), model(x, t, y), rtol=RTOL, atol=ATOL)
        assert (model(x, t, y) - model(x, t)).abs().max() > 1e-3  # the labels matter to the output compared
    eager = build_inference_network(model, "eager", (1, 8, 8), "cpu")
    assert eager.num_classes == 3
    with torch.no_grad():
        torch.testing.assert_close(eager(x, t), model(x, t, torch.full((5,), -1)), rtol=CHECK_TOLERANCE,
                                   atol=CHECK_TOLERANCE)
    plain = build_inference_network(UNet(UNCOND_UNET), "eager", (1, 8, 8), "cpu")
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, y)
