"""Request validation, batching and response encoding of the Serve app, without Ray Serve (fast)."""

from __future__ import annotations

import base64
import io
import re
from typing import get_args

import numpy as np
import pytest
import torch
import yaml
from _diffusion_helpers import single_thread  # noqa: F401 (autouse fixture)
from _unet_helpers import computing_unet
from PIL import Image
from ray.serve.schema import ServeDeploySchema

from deploy.config import DEFAULT_NETWORK, IngressConfig, ModelDeploymentConfig
from deploy.decoding import decode_image_upload, pixels_from_json
from deploy.errors import RequestError
from deploy.http_io import parse_json_model, sample_response
from deploy.limits import Limits, check_content_length, check_likelihood_limits, check_sample_limits, resolve_num_steps
from deploy.model_runner import LikelihoodJob, ModelRunner, SampleJob
from deploy.request_models import (
    SAMPLER_PARAMETERS,
    LikelihoodJsonRequest,
    LikelihoodOptions,
    SampleRequest,
)
from diffusion_core import DiffusionConfig, GaussianDiffusion, UNet, UNetConfig
from diffusion_core.checkpoint import LoadedModel
from diffusion_core.generate import SamplerName, SamplerSettings
from diffusion_core.images import uint8_to_float
from diffusion_core.inference_network import CHECK_TOLERANCE, NETWORK_MODES, build_inference_network
from pipelines.registry.model_identity import ModelIdentity, describe_model, parse_model_uri
from pipelines.registry.model_store import read_manifest_summary
from tooling.local_cluster import SERVE_CONFIG

UNET = UNetConfig(image_size=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, num_groups=4)
DIFFUSION = DiffusionConfig(num_timesteps=24)




#: batched vs alone: the same float32 network on batches of other sizes (kernels may sum in another order)
RTOL, ATOL = 1e-5, 1e-5


def _runner(model: UNet, network: str = "eager") -> ModelRunner:
    """The replica's runner on ``model``; eager by default: the batching tests compare with the eager
    core call at float32 rounding, which a compiled network's fused kernels exceed (test_compile.py
    checks each compiled mode against eager at its own tolerance)."""
    return ModelRunner(LoadedModel(model, GaussianDiffusion(DIFFUSION), UNET, DIFFUSION, {}), ModelIdentity(uri="mem"),
                       network=network)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    """The replica's runner (eager network) on a UNet whose output depends on its input."""
    return _runner(computing_unet(UNET, seed=0))


@pytest.fixture(scope="module")
def zero_runner() -> ModelRunner:
    """The same runner on a freshly initialised UNet, whose output convolution makes every output 0."""
    torch.manual_seed(0)
    return _runner(UNet(UNET).eval())


class _CountCalls:
    """Wraps ``runner.network`` (the network the samplers call) to record the batch size of every evaluation."""

    def __init__(self, runner: ModelRunner) -> None:
        self.sizes: list[int] = []
        self._runner, self._network = runner, runner.network

        def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.sizes.append(x.shape[0])
            return self._network(x, t)

        runner.network = counted

    def __enter__(self) -> "_CountCalls":
        return self

    def __exit__(self, *exc: object) -> None:
        self._runner.network = self._network


def _error(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value


def _png(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------- request schemas and limits


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"num_images": 0}', "num_images"),
        (b'{"num_images": -2}', "num_images"),
        (b'{"num_images": 2.5}', "num_images"),
        (b'{"num_images": "3"}', "num_images"),
        (b'{"num_steps": 0}', "num_steps"),
        (b'{"sampler": "euler"}', "sampler"),
        (b'{"eta": NaN}', "eta"),
        (b'{"eta": 1.5}', "eta"),
        (b'{"seed": -1}', "seed"),
        (b'{"format": "gif"}', "format"),
        (b'{"num_imagez": 2}', "num_imagez"),
        (b'{"sampler": "ddpm", "eta": 0.5}', "eta"),
        (b'{"sampler": "pc", "eta": 0.5}', "eta"),
        (b'{"sampler": "pc", "snr": 0}', "snr"),
        (b'{"sampler": "pc", "snr": -0.1}', "snr"),
        (b'{"sampler": "pc", "snr": "0.1"}', "snr"),
        (b'{"sampler": "langevin", "snr": Infinity}', "snr"),
        (b'{"sampler": "pc", "corrector_steps": -1}', "corrector_steps"),
        (b'{"sampler": "langevin", "corrector_steps": 0}', "corrector_steps"),
        (b'{"sampler": "dpm_solver", "order": 3}', "order"),
        (b'{"sampler": "dpm_solver", "order": 0}', "order"),
        (b'{"sampler": "dpm_solver", "order": 1.0}', "order"),
        (b'{"sampler": "dpm_solver", "spacing": "cosine"}', "spacing"),
        (b'{"sampler": "dpm_solver", "algorithm": "sde"}', "algorithm"),
        (b'{"sampler": "ddim", "algorithm": "sde-dpmsolver++"}', "algorithm"),
        (b'{"sampler": "ddpm", "spacing": "uniform"}', "spacing"),
        (b'{"sampler": "ddim", "order": 1}', "order"),
        (b'{"sampler": "dpm_solver", "snr": 0.1}', "snr"),
        (b'{"sampler": "ddim", "corrector_steps": 2}', "corrector_steps"),
        (b'{"guidance_scale": -0.5}', "guidance_scale"),
        (b'{"guidance_scale": NaN}', "guidance_scale"),
        (b'{"guidance_scale": Infinity}', "guidance_scale"),
        (b'{"guidance_scale": "2"}', "guidance_scale"),
        (b'{"guidance_scale": null}', "guidance_scale"),
        (b'{"guidance_interval": [2, 1]}', "guidance_interval"),
        (b'{"guidance_interval": [-0.5, 1]}', "guidance_interval"),
        (b'{"guidance_interval": [1, 1]}', "guidance_interval"),
        (b'{"guidance_interval": [0.5]}', "guidance_interval"),
        (b'{"guidance_interval": [0.5, 1, 2]}', "guidance_interval"),
        (b'{"guidance_interval": [null, 1]}', "guidance_interval"),
        (b'{"guidance_interval": [0.5, Infinity]}', "guidance_interval"),
        (b'{"guidance_interval": [NaN, 1]}', "guidance_interval"),
        (b'{"guidance_interval": [true, 2]}', "guidance_interval"),
        (b'{"guidance_interval": "0.5,1"}', "guidance_interval"),
        (b'{"guidance_interval": [0.5, null]}', None),
        (b'{"class_label": -1}', "class_label"),
        (b'{"class_label": true}', "class_label"),
        (b'{"class_label": 1.0}', "class_label"),
        (b'{"class_label": ""}', "class_label"),
        (b'{"class_label": []}', "class_label"),
        (b'{"class_label": {"name": "Sandal"}}', "class_label"),
        (b'{"class_label": [1, [2]], "num_images": 2}', "class_label"),
        (b'{"class_label": [1, 2], "num_images": 3}', "class_label"),
        (b'{"class_label": ["Sandal"]}', None),
    ],
)
def test_sample_request_rejects_bad_fields_by_name(body: bytes, field: str | None) -> None:
    if field is None:  # a well-formed body of the same family: accepted
        parse_json_model(SampleRequest, body)
        return
    err = _error(parse_json_model, SampleRequest, body)
    assert err.status == 422 and err.field == field
    assert err.body()["error"].startswith(f"{field}: ") and err.body()["field"] == field


def test_sample_request_defaults_and_limits() -> None:
    request = parse_json_model(SampleRequest, b'{"num_images": 3, "seed": 5}')
    fields = (request.num_images, request.sampler, request.num_steps, request.eta, request.format)
    assert fields == (3, "ddim", None, 0.0, "png")
    limits = Limits(max_num_images=2, max_num_steps=10)
    assert _error(check_sample_limits, request, limits).status == 413
    too_many_steps = SampleRequest(num_steps=11)
    err = _error(check_sample_limits, too_many_steps, limits)
    assert (err.status, err.field) == (413, "num_steps")
    check_sample_limits(SampleRequest(num_images=2, num_steps=10), limits)  # at the limits: fine
    assert (request.class_label, request.guidance_scale) == (None, 1.0)  # no label, the conditional model's scale


def test_class_label_and_guidance_scale_take_indices_names_and_lists() -> None:
    one = parse_json_model(SampleRequest, b'{"class_label": "Sandal", "guidance_scale": 2, "num_images": 3}')
    assert (one.class_label, one.guidance_scale) == ("Sandal", 2.0)
    listed = parse_json_model(SampleRequest, b'{"class_label": [5, "Bag", null], "guidance_scale": 0, "num_images": 3}')
    assert (listed.class_label, listed.guidance_scale) == ([5, "Bag", None], 0.0)
    assert parse_json_model(SampleRequest, b'{"class_label": 0}').class_label == 0
    err = _error(parse_json_model, SampleRequest, b'{"class_label": [1, 2], "num_images": 3}')
    assert err.message.startswith("2 labels for num_images=3")
    err = _error(parse_json_model, SampleRequest, b'{"class_label": -1}')
    assert "negative" in err.message and "null" in err.message
    likelihood = parse_json_model(LikelihoodJsonRequest, b'{"pixels": [[[0]]], "class_label": [3]}')
    assert likelihood.class_label == [3]
    assert _error(parse_json_model, LikelihoodJsonRequest, b'{"pixels": [[[0]]], "class_label": 2.5}').field == \
        "class_label"
    assert _error(parse_json_model, LikelihoodJsonRequest, b'{"pixels": [[[0]]], "guidance_scale": 2}').field == \
        "guidance_scale"  # the bound is unguided: no such field


def test_sampler_parameters_are_taken_per_sampler() -> None:
    pc = parse_json_model(SampleRequest, b'{"sampler": "pc", "num_steps": 8, "corrector_steps": 2, "snr": 0.2}')
    assert pc.sampler_parameters() == {"corrector_steps": 2, "snr": 0.2}
    dpm = parse_json_model(SampleRequest, b'{"sampler": "dpm_solver", "order": 1, "spacing": "uniform"}')
    assert dpm.sampler_parameters() == {"spacing": "uniform", "order": 1}
    sde = parse_json_model(SampleRequest, b'{"sampler": "dpm_solver", "algorithm": "sde-dpmsolver++"}')
    assert sde.sampler_parameters() == {"algorithm": "sde-dpmsolver++"}
    assert SampleRequest(eta=0.3).sampler_parameters() == {"eta": 0.3}
    assert SampleRequest(sampler="ddpm", eta=0.0).sampler_parameters() == {}  # eta 0 is accepted with any sampler
    err = _error(parse_json_model, SampleRequest, b'{"sampler": "ddpm", "order": 2}')
    assert err.message == "order applies to sampler 'dpm_solver' only; omit it for 'ddpm'"
    # the schema's table of parameters is the sampler registry's, as the core's
    for sampler, names in SAMPLER_PARAMETERS.items():
        assert set(names) == set(SamplerSettings(sampler).uses()) - {"num_steps"}
    assert set(SAMPLER_PARAMETERS) == set(get_args(SamplerName))


def test_resolve_num_steps_follows_the_model() -> None:
    assert resolve_num_steps("ddpm", None, 40, 100) == 40
    assert resolve_num_steps("ddim", None, 40, 100) == 40 and resolve_num_steps("ddim", None, 1000, 1000) == 50
    assert resolve_num_steps("ddim", 7, 40, 100) == 7
    assert _error(resolve_num_steps, "ddpm", 10, 40, 100).status == 422
    assert _error(resolve_num_steps, "ddim", 41, 40, 100).status == 422
    err = _error(resolve_num_steps, "ddpm", None, 40, 39)
    assert (err.status, err.field) == (413, "num_steps")
    assert resolve_num_steps("dpm_solver", None, 40, 100) == 20 and resolve_num_steps("dpm_solver", None, 8, 100) == 8
    assert resolve_num_steps("pc", None, 1000, 1000) == 50 and resolve_num_steps("langevin", 9, 40, 100) == 9
    assert _error(resolve_num_steps, "pc", 41, 40, 100).status == 422


def test_sample_job_limits_count_network_evaluations(runner: ModelRunner) -> None:
    """max_num_steps bounds network evaluations per image: S (1 + M) for pc, S M + 1 for langevin."""
    def job(body: bytes, limit: int) -> SampleJob:
        return runner.make_sample_job(parse_json_model(SampleRequest, body), 1, limit)

    pc = b'{"sampler": "pc", "num_steps": 6, "corrector_steps": 2}'
    assert job(pc, 18).sampler_settings == SamplerSettings("pc", 6, corrector_steps=2)
    err = _error(job, pc, 17)
    assert (err.status, err.field) == (413, "corrector_steps") and "18 network evaluations" in err.message
    assert _error(job, b'{"sampler": "pc", "num_steps": 18}', 17).field == "num_steps"
    assert job(b'{"sampler": "pc", "num_steps": 6}', 12).corrector_steps == 1  # default M = 1: 12 evaluations
    langevin = b'{"sampler": "langevin", "num_steps": 5, "corrector_steps": 3}'
    assert job(langevin, 16).sampler_settings.network_evaluations(24) == 16
    assert _error(job, langevin, 15).field == "corrector_steps"
    assert _error(job, b'{"sampler": "langevin", "num_steps": 5}', 5).field == "num_steps"  # 5 + 1 with M = 1
    dpm = job(b'{"sampler": "dpm_solver", "order": 1}', 20)
    assert (dpm.num_steps, dpm.order, dpm.sampler_settings.spacing) == (20, 1, "logsnr")
    assert _error(job, b'{"sampler": "dpm_solver"}', 19).field == "num_steps"
    ddim = job(b'{"num_steps": 4, "eta": 0.5, "spacing": "quadratic"}', 4)
    assert ddim.settings == (("sampler", "ddim"), ("num_steps", 4), ("eta", 0.5), ("spacing", "quadratic"),
                             ("clip_denoised", True))
    assert job(b'{"sampler": "ddpm"}', 24).settings == (("sampler", "ddpm"), ("clip_denoised", True))
    with pytest.raises(ValueError, match="snr"):
        SampleJob(1, "pc", 4, 0.0, 1, True, snr=-1.0)


def test_likelihood_options_and_limits() -> None:
    err = _error(parse_json_model, LikelihoodJsonRequest, b'{"pixels": [[[0]]], "method": "approx"}')
    assert err.field == "method"
    err = _error(parse_json_model, LikelihoodJsonRequest, b'{"pixels": [[[0]]], "num_samples": 1}')
    assert err.field == "num_samples"
    assert _error(parse_json_model, LikelihoodJsonRequest, b'{"pixels": []}').field == "pixels"
    options = LikelihoodOptions(num_samples=40)
    err = _error(check_likelihood_limits, options, 1, "files", Limits(max_num_samples=32))
    assert (err.status, err.field) == (413, "num_samples")
    err = _error(check_likelihood_limits, LikelihoodOptions(), 5, "files", Limits(max_likelihood_images=4))
    assert (err.status, err.field) == (413, "files")
    # form fields arrive as strings: the multipart path validates them leniently
    assert LikelihoodOptions.model_validate({"num_samples": "8", "breakdown": "true"}, strict=False).num_samples == 8


def test_content_length_is_checked_before_reading() -> None:
    check_content_length("100", 100)
    assert _error(check_content_length, "101", 100).status == 413
    assert _error(check_content_length, None, 100).status == 411
    assert _error(check_content_length, "abc", 100).status == 411


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        ([[[0, 1], [2]]], "ragged"),
        ([[0, 1]], "4-D"),
        ([[[0, 256]]], "[0, 255]"),
        ([[[0, -1]]], "[0, 255]"),
        ([[[0.0, float("nan")]]], "NaN"),
        ([[[0.5, 1.0]]], "fractional"),
        ([[["a", "b"]]], "integers"),
        ([[[True, False]]], "integers"),
    ],
)
def test_json_pixels_rejected(pixels, message: str) -> None:
    err = _error(pixels_from_json, pixels, 10_000)
    assert err.status == 422 and err.field == "pixels" and message in err.message


def test_json_pixels_accepted_and_bounded() -> None:
    grey = pixels_from_json([[[0, 255], [7, 8]]], 100)
    assert grey.dtype == np.uint8 and grey.shape == (1, 2, 2, 1) and grey[0, 1, 0, 0] == 7
    assert pixels_from_json([[[[1, 2, 3]]]], 100).shape == (1, 1, 1, 3)
    assert pixels_from_json([[[1.0, 2.0]]], 100).dtype == np.uint8
    assert _error(pixels_from_json, [[[0] * 11]], 10).status == 413


def test_image_uploads() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert np.array_equal(decode_image_upload(_png(grey), "files[0]", 100)[..., 0], grey)
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert decode_image_upload(_png(rgb), "files[0]", 100).shape == (8, 8, 3)
    assert decode_image_upload(_png(grey, "JPEG"), "files[0]", 100).shape == (8, 8, 1)
    noise = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)  # incompressible
    cases = {
        b"hello, not an image": "not a PNG/JPEG",
        _png(noise)[: len(_png(noise)) // 2]: "truncated",
        _png(np.zeros((8, 8, 4), np.uint8)): "mode 'RGBA'",
        b"": "empty",
    }
    for data, message in cases.items():
        err = _error(decode_image_upload, data, "files[1]", 100)
        assert (err.status, err.field) == (422, "files[1]") and message in err.message
    huge = _png(np.zeros((2000, 2000), np.uint8))  # 4 MP of zeros compress to a few KB
    assert len(huge) < 50_000
    err = _error(decode_image_upload, huge, "files[0]", 1_000_000)
    assert err.status == 413 and "2000x2000" in err.message


def test_serve_config_yaml_is_valid() -> None:
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "deploy.serve_app:app"
    assert "MLFLOW_TRACKING_URI" in application.runtime_env["env_vars"]
    deployments = {d.name: d for d in application.deployments}
    model = deployments["DDPMModel"]
    ModelDeploymentConfig.model_validate(model.user_config)
    IngressConfig.model_validate(deployments["DDPMIngress"].user_config)
    assert model.autoscaling_config["target_ongoing_requests"] > 0
    assert model.max_ongoing_requests >= model.user_config["max_batch_size"]
    assert model.ray_actor_options.num_cpus >= 1


def test_app_builder_takes_key_value_args() -> None:
    import pydantic

    from deploy.serve_app import app_builder

    ingress = app_builder({"model_uri": "/some/checkpoint", "max_batch_size": "4"})._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert (ingress.name, model.name) == ("DDPMIngress", "DDPMModel")
    assert ingress.user_config == IngressConfig().model_dump()
    assert model.user_config == {"model_uri": "/some/checkpoint", "max_batch_size": 4, "batch_wait_timeout_s": 0.1,
                                 "network": DEFAULT_NETWORK}
    compiled = app_builder({"model_uri": "x", "network": "compiled"})._bound_deployment.init_args[0]._bound_deployment
    assert compiled.user_config["network"] == "compiled"
    with pytest.raises(pydantic.ValidationError):
        app_builder({"model_uri": "x", "network": "jit"})
    with pytest.raises(ValueError, match=r"network='torchscript' is not allowed; choose one of \['eager', 'compiled'"):
        app_builder({"model_uri": "x", "network": "torchscript"})
    with pytest.raises(pydantic.ValidationError):
        app_builder({"model_uri": "x", "max_batch_sise": "4"})


# ---------------------------------------------------------------- batching: sampling


def _reference_sample(runner: ModelRunner, job: SampleJob) -> torch.Tensor:
    diffusion, model = runner.loaded.diffusion, runner.loaded.model
    generator = torch.Generator().manual_seed(job.seed)
    shape = (job.num_images, *runner.image_shape)
    settings, clip = job.sampler_settings, job.clip_denoised
    if job.sampler == "ddpm":
        return diffusion.p_sample_loop(model, shape, generator=generator, clip_denoised=clip)
    if job.sampler == "pc":
        return diffusion.pc_sample_loop(model, shape, num_steps=job.num_steps, corrector_steps=job.corrector_steps,
                                        snr=job.snr, spacing=settings.spacing, generator=generator, clip_denoised=clip)
    if job.sampler == "langevin":
        return diffusion.langevin_sample_loop(model, shape, num_steps=job.num_steps,
                                              corrector_steps=job.corrector_steps, snr=job.snr,
                                              spacing=settings.spacing, generator=generator, clip_denoised=clip)
    if job.sampler == "dpm_solver":
        return diffusion.dpm_solver_sample_loop(model, shape, num_steps=job.num_steps, order=job.order,
                                                spacing=settings.spacing, generator=generator, clip_denoised=clip,
                                                algorithm=job.algorithm)
    return diffusion.ddim_sample_loop(model, shape, num_steps=job.num_steps, eta=job.eta, generator=generator,
                                      clip_denoised=clip, spacing=settings.spacing)


def test_runner_network_is_the_default_mode_and_matches_the_eager_model(zero_runner: ModelRunner) -> None:
    default = ModelRunner(LoadedModel(computing_unet(UNET, seed=0), GaussianDiffusion(DIFFUSION), UNET, DIFFUSION, {}),
                          ModelIdentity(uri="mem"))
    assert default.describe()["network"] == default.network_mode == DEFAULT_NETWORK
    x, t = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3, 23, 7, 7])
    with torch.no_grad():
        ours = default.network(x, t)
        torch.testing.assert_close(ours, default.loaded.model(x, t), rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE)
        assert ours.abs().min() > 0 and not torch.allclose(ours, zero_runner.network(x, t))


def test_inference_network_keeps_the_eager_model_when_building_fails() -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return x * 2 if bool((t > 0).any()) else x  # control flow on values: torch.export refuses it

    model = DataDependent()
    built = build_inference_network(model, "exported", (1, 2, 2), torch.device("cpu"))
    assert built.forward is model and built.mode == "eager" and built.reason
    with pytest.raises(ValueError, match=re.escape(f"network='torchscript' is not allowed; choose one of {list(NETWORK_MODES)}")):
        build_inference_network(model, "torchscript", (1, 2, 2), torch.device("cpu"))
    with pytest.raises(ValueError, match="network='torchscript' is not allowed"):
        ModelRunner(LoadedModel(UNet(UNET), GaussianDiffusion(DIFFUSION), UNET, DIFFUSION, {}),
                    ModelIdentity(uri="mem"), network="torchscript")


def test_batched_sampling_equals_each_request_alone_and_shares_evaluations(runner: ModelRunner,
                                                                          zero_runner: ModelRunner) -> None:
    jobs = [
        SampleJob(2, "ddim", 5, 0.5, 11, True),
        SampleJob(1, "ddpm", 24, 0.0, 12, True),
        SampleJob(3, "ddim", 5, 0.5, 13, True),
        SampleJob(1, "ddim", 5, 0.0, 14, False),
        SampleJob(1, "ddim", 5, 0.5, 15, True),
    ]
    with _CountCalls(runner) as calls:
        results = runner.sample_many(jobs)
    zero = zero_runner.sample_many(jobs)
    for job, result, zero_result in zip(jobs, results, zero):
        assert result.shape == (job.num_images, 1, 8, 8)
        torch.testing.assert_close(result, _reference_sample(runner, job), rtol=RTOL, atol=ATOL)
        assert (result - zero_result).abs().max() > 1e-2  # the network's output shapes the images
    # three jobs share settings (ddim, 5, 0.5, clip): 5 evaluations of 6 images, not 15 of 1-3
    assert sorted(calls.sizes) == sorted([6] * 5 + [1] * 24 + [1] * 5)
    # the same seed alone gives the same images (batching does not change results)
    torch.testing.assert_close(runner.sample_many([jobs[2]])[0], results[2], rtol=RTOL, atol=ATOL)
    assert not torch.allclose(results[0], results[4][:1].expand(2, -1, -1, -1))


def test_batched_sampling_of_every_sampler_groups_by_all_parameters(runner: ModelRunner) -> None:
    jobs = [
        SampleJob(2, "pc", 3, 0.0, 21, True, corrector_steps=1, snr=0.2),
        SampleJob(1, "dpm_solver", 4, 0.0, 22, True),
        SampleJob(1, "pc", 3, 0.0, 23, True, corrector_steps=1, snr=0.2),
        SampleJob(1, "pc", 3, 0.0, 24, True, corrector_steps=1, snr=0.3),  # another snr: its own group
        SampleJob(2, "dpm_solver", 4, 0.0, 25, True, order=1),  # another order: its own group
        SampleJob(1, "langevin", 2, 0.0, 26, True, corrector_steps=2),
        SampleJob(1, "dpm_solver", 4, 0.0, 27, True, spacing="logsnr"),  # = the default spacing: same group
        SampleJob(1, "ddim", 4, 0.0, 28, True, spacing="quadratic"),
        SampleJob(1, "dpm_solver", 4, 0.0, 29, True, algorithm="sde-dpmsolver++"),  # the SDE: its own group
    ]
    with _CountCalls(runner) as calls:
        results = runner.sample_many(jobs)
    for job, result in zip(jobs, results):
        assert isinstance(result, torch.Tensor), result
        assert result.shape == (job.num_images, 1, 8, 8)
        torch.testing.assert_close(result, _reference_sample(runner, job), rtol=RTOL, atol=ATOL)
    # pc snr 0.2 (3 images, S (1 + M) = 6 evaluations), dpm_solver order 2 (2 images, 4), dpm_solver order 1
    # (2 images, 4), and 1 image each: pc snr 0.3 (6), langevin (S M + 1 = 5), ddim quadratic (4), SDE (4)
    expected = [3] * 6 + [2] * 4 + [2] * 4 + [1] * (6 + 5 + 4 + 4)
    assert sorted(calls.sizes) == sorted(expected)


def test_sampling_failure_is_isolated(runner: ModelRunner) -> None:
    good = SampleJob(1, "ddim", 4, 0.0, 1, True)
    same_group_bad = SampleJob(1, "ddim", 4, 0.0, 2**70, True)  # seed too large for torch: fails alone
    too_many_steps = SampleJob(1, "ddim", 99, 0.0, 3, True)  # more steps than T=24: the core raises
    results = runner.sample_many([good, too_many_steps, same_group_bad])
    assert isinstance(results[0], torch.Tensor)
    assert isinstance(results[1], ValueError) and isinstance(results[2], Exception)
    torch.testing.assert_close(results[0], _reference_sample(runner, good), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- batching: likelihood


def _images(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def _reference_bpd(runner: ModelRunner, job: LikelihoodJob) -> dict:
    x = torch.from_numpy(uint8_to_float(job.pixels).transpose(0, 3, 1, 2).copy())
    generator = torch.Generator().manual_seed(job.seed)
    diffusion, model = runner.loaded.diffusion, runner.loaded.model
    if job.method == "exact":
        return diffusion.calc_bpd_loop(model, x, generator=generator)
    return diffusion.calc_bpd_estimate(model, x, num_samples=job.num_samples, generator=generator)


def test_batched_likelihood_equals_core_per_seed_and_merges_calls(runner: ModelRunner,
                                                                  zero_runner: ModelRunner) -> None:
    jobs = [
        LikelihoodJob(_images(0, 2), "estimate", 4, 100, False),
        LikelihoodJob(_images(1, 1), "exact", 4, 101, True),
        LikelihoodJob(_images(2, 3), "estimate", 4, 102, True),
    ]
    with _CountCalls(runner) as calls:
        results = runner.likelihood_many(jobs)
    for job, rows in zip(jobs, results):
        reference = _reference_bpd(runner, job)
        assert len(rows) == job.pixels.shape[0]
        np.testing.assert_allclose([r["bpd"] for r in rows], reference["total_bpd"].numpy(), rtol=1e-5)
        if job.method == "estimate":
            np.testing.assert_allclose([r["stderr"] for r in rows], reference["stderr"].numpy(), rtol=1e-4)
            assert all(r["num_samples"] == 4 for r in rows)
    zero = zero_runner.likelihood_many(jobs)
    assert all(abs(ours[0]["bpd"] - theirs[0]["bpd"]) > 1e-3 for ours, theirs in zip(results, zero))
    exact_terms = results[1][0]["terms_bpd"]
    assert len(exact_terms) == 24 and results[1][0]["prior_bpd"] >= 0
    assert abs(sum(exact_terms) + results[1][0]["prior_bpd"] - results[1][0]["bpd"]) < 1e-3
    assert "terms_bpd_estimate" in results[2][0] and "prior_bpd" not in results[0][0]
    # the two estimates (K=4, 2 + 3 images) share 4 evaluations of 5 images; the exact bound runs alone
    assert sorted(calls.sizes) == sorted([5] * 4 + [1] * 24)


def test_likelihood_failure_is_isolated(runner: ModelRunner) -> None:
    good = LikelihoodJob(_images(3, 1), "estimate", 2, 7, False)
    wrong_size = LikelihoodJob(np.zeros((1, 6, 8, 1), np.uint8), "estimate", 2, 8, False)
    bad_k = LikelihoodJob(_images(4, 1), "estimate", 1, 9, False)
    results = runner.likelihood_many([good, wrong_size, bad_k])
    assert isinstance(results[1], Exception) and isinstance(results[2], ValueError)
    assert results[0][0]["bpd"] == pytest.approx(float(_reference_bpd(runner, good)["total_bpd"][0]), rel=1e-5)


def test_likelihood_job_checks_against_the_model(runner: ModelRunner) -> None:
    options = LikelihoodOptions()
    err = _error(runner.make_likelihood_job, options, np.zeros((1, 9, 8, 1), np.uint8), 0, "files", 100)
    assert (err.status, err.field) == (422, "files") and "8x8" in err.message
    err = _error(runner.make_likelihood_job, options, np.zeros((1, 8, 8, 3), np.uint8), 0, "pixels", 100)
    assert (err.status, err.field) == (422, "pixels") and "channel" in err.message
    err = _error(runner.make_likelihood_job, LikelihoodOptions(num_samples=49), _images(0, 1), 0, "files", 100)
    assert (err.status, err.field) == (422, "num_samples")
    err = _error(runner.make_likelihood_job, LikelihoodOptions(method="exact"), _images(0, 1), 0, "files", 11)
    assert (err.status, err.field) == (413, "method")
    assert runner.make_likelihood_job(options, _images(0, 2), 5, "files", 100).seed == 5


# ---------------------------------------------------------------- responses and model identity


def test_sample_response_formats() -> None:
    images = torch.linspace(-1, 1, 2 * 1 * 4 * 4).reshape(2, 1, 4, 4).numpy()
    meta = {"seed": 3, "model": {"version": "7"}}
    as_json = sample_response(images, "png", meta)
    body = __import__("json").loads(as_json.body)
    assert body["shape"] == [2, 4, 4, 1] and body["seed"] == 3
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))))
    assert first.shape == (4, 4) and first[0, 0] == 0 and first.dtype == np.uint8
    npy = sample_response(images, "npy", meta)
    array = np.load(io.BytesIO(npy.body))
    assert npy.media_type == "application/octet-stream" and array.dtype == np.uint8 and array.shape == (2, 4, 4, 1)
    assert array[1, 3, 3, 0] == 255 and np.array_equal(array[0, ..., 0], first)
    grid = sample_response(images, "grid", meta)
    assert grid.media_type == "image/png" and grid.headers["x-seed"] == "3" and grid.headers["x-model-version"] == "7"
    assert Image.open(io.BytesIO(grid.body)).size == (2 * 4 + 3 * 2, 1 * 4 + 2 * 2)


def test_model_source_and_manifest_summary(tmp_path) -> None:
    assert describe_model("runs:/abc123/model").run_id == "abc123"
    local = describe_model(str(tmp_path), {"run_id": "r1"})
    assert describe_model(str(tmp_path), {"mlflow_run_id": "r2"}).run_id == "r2"
    assert parse_model_uri("models:/ddpm/3") == parse_model_uri("models:/ddpm/3")
    assert (parse_model_uri("models:/ddpm/3").name, parse_model_uri("models:/ddpm/3").version) == ("ddpm", "3")
    assert (parse_model_uri("models:/ddpm@prod").kind, parse_model_uri("models:/ddpm@prod").alias) == ("alias", "prod")
    assert parse_model_uri("s3://bucket/model").kind == "other"
    with pytest.raises(ValueError, match="non-empty"):
        parse_model_uri("  ")
    assert (local.name, local.version, local.run_id) == (None, None, "r1")
    assert read_manifest_summary(tmp_path) is None
    (tmp_path / "manifest.json").write_text('{"counts": {"train": 5}, "rejected": [1, 2], "command": "x"}')
    assert read_manifest_summary(tmp_path) == {"counts": {"train": 5}, "num_rejected": 2}
