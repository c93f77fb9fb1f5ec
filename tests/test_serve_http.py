"""The Serve app over real HTTP: `serve deploy` of a deploy/serve_config.yaml-style config on a private
local Ray cluster, serving a tiny model trained here and registered in a SQLite MLflow registry."""

from __future__ import annotations

import base64
import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import requests
import torch
from _serve_helpers import (
    COND_MODEL_NAME,
    FASHION_MNIST_CLASSES,
    MODEL_NAME,
    ConditionalModel,
    RegisteredModels,
    read_idx_images,
    register_tiny_conditional_model,
    register_tiny_models,
)
from PIL import Image

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.generate import SamplerSettings, generate, guided_network_evaluations
from diffusion_core.guidance import with_class_labels
from diffusion_core.images import encode_png, images_to_pngs, uint8_to_float
from tooling.local_cluster import LocalRayCluster, derive_serve_config

pytestmark = pytest.mark.slow

LIMITS = {"max_num_images": 6, "max_num_steps": 100, "max_num_samples": 32, "max_likelihood_images": 8,
          "max_upload_bytes": 300_000, "max_image_pixels": 4096}
T = 40  # the tiny model's num_timesteps (see _serve_helpers.TINY_DIFFUSION)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> RegisteredModels:
    return register_tiny_models(tmp_path_factory.mktemp("serve-models"), fashion_mnist_dir)


@pytest.fixture(scope="module")
def served(models: RegisteredModels, tmp_path_factory: pytest.TempPathFactory):
    """(cluster, deploy(model_uri)) with models:/<name>/1 deployed and healthy."""
    cluster = LocalRayCluster(num_cpus=4)
    config_path = tmp_path_factory.mktemp("serve-config") / "serve_config.yaml"

    def deploy(model_uri: str) -> None:
        cluster.serve_deploy(derive_serve_config(models.tracking_uri, cluster, model_uri, LIMITS), config_path)

    try:
        deploy(models.v1.model_uri)
        cluster.wait_healthy()
        yield cluster, deploy
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def http(served) -> str:
    return served[0].http


@pytest.fixture(scope="module")
def test_images(fashion_mnist_dir: Path) -> np.ndarray:
    """Four real Fashion-MNIST test images, uint8 [4, 28, 28]."""
    return read_idx_images(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz", 4)


@pytest.fixture(scope="module")
def local_v1(models: RegisteredModels):
    torch.set_num_threads(1)  # like the replica (num_cpus: 1)
    return load_checkpoint(models.checkpoint_v1)


def _wait_for(http: str, done: Callable[[requests.Response, requests.Response], bool], what: str,
              timeout_s: float = 180) -> tuple[requests.Response, requests.Response]:
    """Poll ``GET /healthz`` and ``GET /model`` until ``done(healthz, model)``; returns the last pair."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            last = (requests.get(f"{http}/healthz", timeout=30), requests.get(f"{http}/model", timeout=30))
            if done(*last):
                return last
        except requests.RequestException as err:
            last = err
        time.sleep(0.5)
    detail = last if not isinstance(last, tuple) else [(r.status_code, r.text[:300]) for r in last]
    raise AssertionError(f"{what}: not reached in {timeout_s} s (last: {detail})")


def _serves_version(version: str) -> Callable[[requests.Response, requests.Response], bool]:
    """``_wait_for`` condition: healthy, and /model reports registered ``version`` of ``MODEL_NAME``."""
    return lambda health, model: (health.status_code == 200 and model.status_code == 200
                                  and model.json().get("name") == MODEL_NAME and model.json().get("version") == version)


def _restore_v1(served, models: RegisteredModels) -> None:
    """Deploy models:/<name>/1 again (the state every other test expects) and wait until it is served."""
    cluster, deploy = served
    deploy(models.v1.model_uri)
    _wait_for(cluster.http, _serves_version("1"), "version 1 served again")


def _pngs(response: requests.Response) -> list[bytes]:
    assert response.status_code == 200, response.text
    return [base64.b64decode(image) for image in response.json()["images"]]


def _to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [-1, 1]."""
    return torch.from_numpy(uint8_to_float(images)[:, None].copy())


def test_healthz_and_model_info(http: str, models: RegisteredModels) -> None:
    health = requests.get(f"{http}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["model"]["version"] == "1"
    info = requests.get(f"{http}/model", timeout=30).json()
    assert (info["name"], info["version"], info["run_id"]) == ("ddpm-serve-test", "1", models.v1.run_id)
    assert info["config"]["diffusion"]["num_timesteps"] == T and info["image_shape"] == [1, 28, 28]
    assert info["data_manifest"]["counts"] == {"train": 512, "val": 0}
    assert info["replica"]["torch_threads"] == 1 and info["batching"]["max_batch_size"] == 8
    assert (info["num_classes"], info["classes"]) == (None, None)  # an unconditional model


def test_sampling_returns_seeded_pngs_for_ddim_and_ddpm(http: str, local_v1) -> None:
    request = {"num_images": 3, "sampler": "ddim", "num_steps": 6, "eta": 0.0, "seed": 1234}
    first = _pngs(requests.post(f"{http}/sample", json=request, timeout=120))
    assert len(first) == 3
    for png in first:
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size == (28, 28) and image.mode == "L"
    assert _pngs(requests.post(f"{http}/sample", json=request, timeout=120)) == first  # same seed, same bytes
    other = _pngs(requests.post(f"{http}/sample", json={**request, "seed": 99}, timeout=120))
    assert other != first
    # ...and they are the core sampler's images for that seed
    expected = local_v1.diffusion.ddim_sample_loop(local_v1.model, (3, 1, 28, 28), num_steps=6,
                                                   generator=torch.Generator().manual_seed(1234))
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in first])
    reference = np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in images_to_pngs(expected)])
    assert np.abs(decoded.astype(int) - reference.astype(int)).max() <= 1

    ddpm = {"num_images": 2, "sampler": "ddpm", "seed": 7}
    response = requests.post(f"{http}/sample", json=ddpm, timeout=120)
    body = response.json()
    assert body["num_steps"] == T and body["shape"] == [2, 28, 28, 1] and body["model"]["version"] == "1"
    assert _pngs(response) == _pngs(requests.post(f"{http}/sample", json=ddpm, timeout=120))


def test_sampling_with_dpm_solver_and_pc(http: str, local_v1) -> None:
    cases = [
        ({"num_images": 3, "sampler": "dpm_solver", "num_steps": 5, "order": 2, "seed": 8},
         SamplerSettings("dpm_solver", 5, order=2), 5),
        ({"num_images": 2, "sampler": "dpm_solver", "num_steps": 4, "algorithm": "sde-dpmsolver++", "seed": 8},
         SamplerSettings("dpm_solver", 4, algorithm="sde-dpmsolver++"), 4),
        ({"num_images": 2, "sampler": "pc", "num_steps": 4, "corrector_steps": 2, "snr": 0.1, "seed": 9},
         SamplerSettings("pc", 4, corrector_steps=2, snr=0.1), 12),
    ]
    for request, settings, evaluations in cases:
        response = requests.post(f"{http}/sample", json=request, timeout=120)
        pngs = _pngs(response)
        body = response.json()
        assert len(pngs) == request["num_images"] and body["shape"] == [request["num_images"], 28, 28, 1]
        assert {key: body[key] for key in settings.params()} == settings.params()
        assert body["network_evaluations"] == evaluations
        # the core sampler's images for that seed
        expected = generate(local_v1.diffusion, local_v1.model, (request["num_images"], 1, 28, 28), settings,
                            generator=torch.Generator().manual_seed(request["seed"]))
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in pngs])
        reference = np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in images_to_pngs(expected)])
        assert np.abs(decoded.astype(int) - reference.astype(int)).max() <= 1


def test_grid_and_npy_formats(http: str) -> None:
    request = {"num_images": 4, "num_steps": 3, "seed": 5, "eta": 1.0}
    grid = requests.post(f"{http}/sample", json={**request, "format": "grid"}, timeout=120)
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png" and grid.headers["x-seed"] == "5"
    assert Image.open(io.BytesIO(grid.content)).size == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2)
    npy = requests.post(f"{http}/sample", json={**request, "format": "npy"}, timeout=120)
    assert npy.headers["content-type"] == "application/octet-stream"
    array = np.load(io.BytesIO(npy.content))
    assert array.dtype == np.uint8 and array.shape == (4, 28, 28, 1)
    pngs = _pngs(requests.post(f"{http}/sample", json=request, timeout=120))
    assert [encode_png(a) for a in array] == pngs


def test_likelihood_matches_the_core_bound(http: str, local_v1, test_images: np.ndarray) -> None:
    x = _to_float(test_images)
    diffusion, model = local_v1.diffusion, local_v1.model
    exact = requests.post(f"{http}/likelihood", json={"pixels": test_images.tolist(), "method": "exact", "seed": 3,
                                                      "breakdown": True}, timeout=120)
    assert exact.status_code == 200, exact.text
    body = exact.json()
    reference = diffusion.calc_bpd_loop(model, x, generator=torch.Generator().manual_seed(3))
    assert body["unit"] == "bits/dim" and body["method"] == "exact"
    np.testing.assert_allclose([r["bpd"] for r in body["results"]], reference["total_bpd"].numpy(), rtol=1e-4)
    np.testing.assert_allclose(body["results"][2]["terms_bpd"], reference["vb"][2].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([r["prior_bpd"] for r in body["results"]], reference["prior_bpd"].numpy(), rtol=1e-4)

    files = [("files", (f"img{i}.png", encode_png(img[..., None]), "image/png")) for i, img in enumerate(test_images)]
    estimate = requests.post(f"{http}/likelihood", files=files, data={"num_samples": "8", "seed": "11"}, timeout=120)
    assert estimate.status_code == 200, estimate.text
    body = estimate.json()
    reference = diffusion.calc_bpd_estimate(model, x, num_samples=8, generator=torch.Generator().manual_seed(11))
    assert body["method"] == "estimate" and body["num_samples"] == 8
    np.testing.assert_allclose([r["bpd"] for r in body["results"]], reference["total_bpd"].numpy(), rtol=1e-4)
    np.testing.assert_allclose([r["stderr"] for r in body["results"]], reference["stderr"].numpy(), rtol=1e-3)
    # the same images sent as JSON pixels give the same numbers
    as_json = requests.post(f"{http}/likelihood", json={"pixels": test_images.tolist(), "num_samples": 8, "seed": 11},
                            timeout=120).json()
    assert [r["bpd"] for r in as_json["results"]] == [r["bpd"] for r in body["results"]]


def _png_bytes(shape: tuple[int, ...], mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buffer, "PNG")
    return buffer.getvalue()


def _bad_requests(http: str, image: np.ndarray) -> dict[str, tuple[Callable[[], requests.Response], int, str]]:
    """name -> (send, expected status, field the error must name)."""
    good_png = encode_png(image[..., None])

    def sample(body: Any, raw: bool = False) -> Callable[[], requests.Response]:
        if raw:
            return lambda: requests.post(f"{http}/sample", data=body, headers={"content-type": "application/json"},
                                         timeout=120)
        return lambda: requests.post(f"{http}/sample", json=body, timeout=120)

    def upload(data: bytes, **form: str) -> Callable[[], requests.Response]:
        return lambda: requests.post(f"{http}/likelihood", files=[("files", ("x.png", data, "image/png"))], data=form,
                                     timeout=120)

    def pixels(values: Any, **options: Any) -> Callable[[], requests.Response]:
        body = json.dumps({"pixels": values, **options}).encode()
        return lambda: requests.post(f"{http}/likelihood", data=body, headers={"content-type": "application/json"},
                                     timeout=120)

    grey = image.tolist()
    return {
        "bad json": (sample(b'{"num_images": 2,', raw=True), 422, "body"),
        "zero images": (sample({"num_images": 0}), 422, "num_images"),
        "negative images": (sample({"num_images": -4}), 422, "num_images"),
        "zero steps": (sample({"num_steps": 0}), 422, "num_steps"),
        "unknown sampler": (sample({"sampler": "euler"}), 422, "sampler"),
        "nan eta": (sample(b'{"eta": NaN}', raw=True), 422, "eta"),
        "unknown format": (sample({"format": "gif"}), 422, "format"),
        "too many images": (sample({"num_images": 7}), 413, "num_images"),
        "too many steps": (sample({"num_steps": 101}), 413, "num_steps"),
        "ddpm wrong steps": (sample({"sampler": "ddpm", "num_steps": 10}), 422, "num_steps"),
        "ddim more steps than T": (sample({"num_steps": 41}), 422, "num_steps"),
        "zero snr": (sample({"sampler": "pc", "snr": 0}), 422, "snr"),
        "negative snr": (sample({"sampler": "langevin", "snr": -0.5}), 422, "snr"),
        "order 3": (sample({"sampler": "dpm_solver", "order": 3}), 422, "order"),
        "order for ddim": (sample({"sampler": "ddim", "order": 1}), 422, "order"),
        "eta for pc": (sample({"sampler": "pc", "eta": 0.5}), 422, "eta"),
        "pc over the evaluation limit": (sample({"sampler": "pc", "num_steps": 40, "corrector_steps": 2}), 413,
                                         "corrector_steps"),
        "not an image": (upload(b"GIF89a? no, plain text"), 422, "files[0]"),
        "truncated png": (upload(_png_bytes((28, 28))[:300]), 422, "files[0]"),
        "wrong size": (upload(_png_bytes((32, 32))), 422, "files"),
        "wrong channels": (upload(_png_bytes((28, 28, 3))), 422, "files"),
        "too many pixels": (upload(_png_bytes((80, 80))), 413, "files[0]"),
        "zero num_samples": (upload(good_png, num_samples="0"), 422, "num_samples"),
        "unknown method": (upload(good_png, method="approx"), 422, "method"),
        "pixels out of range": (pixels([[[300] * 28] * 28]), 422, "pixels"),
        "negative pixels": (pixels([[[-1] * 28] * 28]), 422, "pixels"),
        "nan pixels": (lambda: requests.post(f"{http}/likelihood", data=b'{"pixels": [[[NaN, 1]]]}',
                                             headers={"content-type": "application/json"}, timeout=120), 422, "pixels"),
        "wrong size pixels": (pixels([[row[:20] for row in grey[:20]]]), 422, "pixels"),
        "upload too large": (upload(b"\0" * 400_000), 413, "body"),
        "too many samples": (pixels([grey], num_samples=33), 413, "num_samples"),
        "label on an unconditional model": (sample({"class_label": 1}), 422, "class_label"),
        "name on an unconditional model": (sample({"class_label": "Sandal"}), 422, "class_label"),
        "guidance on an unconditional model": (sample({"guidance_scale": 2}), 422, "guidance_scale"),
        "negative guidance": (sample({"guidance_scale": -1}), 422, "guidance_scale"),
        "nan guidance": (sample(b'{"guidance_scale": NaN}', raw=True), 422, "guidance_scale"),
        "infinite guidance": (sample(b'{"guidance_scale": Infinity}', raw=True), 422, "guidance_scale"),
        "string guidance": (sample({"guidance_scale": "2"}), 422, "guidance_scale"),
        "negative label": (sample({"class_label": -1}), 422, "class_label"),
        "label list of another length": (sample({"num_images": 2, "class_label": [1]}), 422, "class_label"),
        "likelihood label on an unconditional model": (pixels([grey], class_label=1), 422, "class_label"),
    }


def test_bad_inputs_get_4xx_naming_the_field_and_good_requests_still_succeed(
    http: str, test_images: np.ndarray
) -> None:
    cases = _bad_requests(http, test_images[0])
    good_sample = {"num_images": 2, "num_steps": 4, "seed": 21}
    good_likelihood = {"pixels": test_images[:2].tolist(), "num_samples": 4, "seed": 2}
    with ThreadPoolExecutor(max_workers=8) as pool:
        bad = {name: pool.submit(send) for name, (send, _, _) in cases.items()}
        good = [pool.submit(requests.post, f"{http}/sample", json=good_sample, timeout=120),
                pool.submit(requests.post, f"{http}/likelihood", json=good_likelihood, timeout=120)]
    for name, (_, status, field) in cases.items():
        response = bad[name].result()
        assert response.status_code == status, (name, response.status_code, response.text)
        body = response.json()
        assert set(body) == {"error", "field"} and body["field"] == field, (name, body)
        assert body["error"].startswith(f"{field}: "), (name, body)
    sample, likelihood = (future.result() for future in good)
    assert sample.status_code == 200 and len(sample.json()["images"]) == 2, sample.text
    assert likelihood.status_code == 200 and len(likelihood.json()["results"]) == 2, likelihood.text
    missing = requests.get(f"{http}/no-such-endpoint", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json() and "detail" not in missing.json()
    # the replica survived all of it
    assert requests.get(f"{http}/healthz", timeout=30).status_code == 200


def test_user_config_change_reloads_without_restarting_the_replica(served, models: RegisteredModels) -> None:
    cluster, deploy = served
    before = requests.get(f"{cluster.http}/model", timeout=30).json()
    assert before["version"] == "1", before  # the module's deployment state, whatever ran before
    replicas_before = cluster.model_replicas()
    request = {"num_images": 2, "num_steps": 5, "seed": 77}
    images_v1 = _pngs(requests.post(f"{cluster.http}/sample", json=request, timeout=120))
    try:
        deploy(f"models:/{models.v2.name}@champion")
        _, model = _wait_for(cluster.http, _serves_version("2"), "version 2 served", timeout_s=60)
        after = model.json()
        assert (after["version"], after["alias"], after["run_id"]) == ("2", "champion", models.v2.run_id)
        assert after["replica"] == before["replica"]  # same replica id, actor id and pid: reconfigured in place
        assert cluster.model_replicas() == replicas_before
        assert _pngs(requests.post(f"{cluster.http}/sample", json=request, timeout=120)) != images_v1
    finally:
        _restore_v1(served, models)
    # back on version 1: the same request gives version 1's images again
    assert _pngs(requests.post(f"{cluster.http}/sample", json=request, timeout=120)) == images_v1


def test_server_chosen_seed_is_returned_and_reproduces_the_images(http: str) -> None:
    request = {"num_images": 2, "sampler": "ddim", "num_steps": 4}
    seeds, images = [], []
    for _ in range(2):
        response = requests.post(f"{http}/sample", json=request, timeout=120)
        seed = response.json()["seed"]
        assert isinstance(seed, int) and 0 <= seed <= 2**63 - 1, seed
        seeds.append(seed)
        images.append(_pngs(response))
    assert seeds[0] != seeds[1] and images[0] != images[1]  # a fresh seed per request
    for seed, pngs in zip(seeds, images):
        again = requests.post(f"{http}/sample", json={**request, "seed": seed}, timeout=120)
        assert again.json()["seed"] == seed and _pngs(again) == pngs  # byte for byte
    # formats without a JSON body carry it in X-Seed
    npy = requests.post(f"{http}/sample", json={**request, "format": "npy"}, timeout=120)
    assert npy.status_code == 200, npy.text
    seed = int(npy.headers["x-seed"])
    again = requests.post(f"{http}/sample", json={**request, "format": "npy", "seed": seed}, timeout=120)
    assert again.headers["x-seed"] == str(seed) and again.content == npy.content


def test_healthz_answers_503_when_no_model_replica_can_serve(served, models: RegisteredModels) -> None:
    """A model URI that cannot be loaded: the model deployment's replicas fail to (re)configure, so
    /healthz must answer 503 naming the model; deploying a good URI makes it healthy again."""
    cluster, deploy = served
    assert requests.get(f"{cluster.http}/healthz", timeout=30).status_code == 200
    try:
        deploy(f"models:/{MODEL_NAME}/99")  # never registered: load_runner raises FileNotFoundError
        health, _ = _wait_for(cluster.http, lambda health, _: health.status_code == 503, "healthz 503")
        body = health.json()
        assert set(body) == {"error", "field"} and body["field"] == "model", body
        assert body["error"].startswith("model: not ready: "), body
        # requests are refused meanwhile, not held until a replica comes
        sample = requests.post(f"{cluster.http}/sample", json={"num_images": 1, "num_steps": 2}, timeout=60)
        assert sample.status_code == 503, (sample.status_code, sample.text[:300])
    finally:
        _restore_v1(served, models)
    assert requests.get(f"{cluster.http}/healthz", timeout=30).json()["model"]["version"] == "1"


# ---------------------------------------------------------------- a class-conditional model


@pytest.fixture(scope="module")
def conditional(models: RegisteredModels, tmp_path_factory: pytest.TempPathFactory,
                fashion_mnist_dir: Path) -> ConditionalModel:
    """The tiny class-conditional model, registered in the same store as ``models`` (Fashion-MNIST class names)."""
    return register_tiny_conditional_model(tmp_path_factory.mktemp("serve-cond"), models.tracking_uri,
                                           fashion_mnist_dir)


def _decoded(pngs: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in pngs]).astype(int)


def _png_pixels(images: torch.Tensor) -> np.ndarray:
    """Float images [N, 1, H, W] as the uint8 pixels of their PNGs, int [N, H, W]."""
    return _decoded(images_to_pngs(images))


def test_conditional_model_over_http(served, models: RegisteredModels, conditional: ConditionalModel,
                                     test_images: np.ndarray) -> None:
    """A class-conditional model served by name: /model lists its classes; /sample takes a class name or
    index (or one per image) and a guidance scale and draws the core sampler's images; guided and
    unguided requests sent together give the images each gives alone; labels that do not fit the model
    get 422 naming class_label; /likelihood takes a class_label."""
    cluster, deploy = served
    http = cluster.http
    torch.set_num_threads(1)
    local = load_checkpoint(conditional.checkpoint)
    try:
        deploy(conditional.ref.model_uri)
        _, model = _wait_for(http, lambda health, info: health.status_code == 200 and info.status_code == 200
                             and info.json().get("name") == COND_MODEL_NAME, "the conditional model served")
        info = model.json()
        assert info["num_classes"] == 10 and info["network"] == "exported"
        assert info["classes"] == [{"index": i, "name": name} for i, name in enumerate(FASHION_MNIST_CLASSES)]

        sandal = {"num_images": 2, "num_steps": 4, "seed": 31, "class_label": "Sandal", "guidance_scale": 2}
        response = requests.post(f"{http}/sample", json=sandal, timeout=120)
        body = response.json()
        assert (body["class_labels"], body["guidance_scale"], body["network_evaluations"]) == ([5, 5], 2.0, 8)
        expected = generate(local.diffusion, local.model, (2, 1, 28, 28), SamplerSettings("ddim", 4),
                            torch.Generator().manual_seed(31), class_labels=[5, 5], guidance_scale=2.0)
        assert np.abs(_decoded(_pngs(response)) - _png_pixels(expected)).max() <= 1
        unguided = generate(local.diffusion, local.model, (2, 1, 28, 28), SamplerSettings("ddim", 4),
                            torch.Generator().manual_seed(31), class_labels=[5, 5], guidance_scale=1.0)
        assert np.abs(_png_pixels(unguided) - _png_pixels(expected)).max() > 1  # the guidance shaped the images
        assert body["guidance_interval"] is None
        # guided only at noise levels sigma_t in (0.5, inf): 2 evaluations at the steps inside, 1 outside
        interval = requests.post(f"{http}/sample", json={**sandal, "guidance_interval": [0.5, None]}, timeout=120)
        steps = SamplerSettings("ddim", 4)
        want = guided_network_evaluations(local.diffusion, steps, 2.0, (0.5, math.inf))
        assert interval.status_code == 200 and interval.json()["guidance_interval"] == [0.5, None], interval.text
        assert 4 < interval.json()["network_evaluations"] == want < 8
        expected = generate(local.diffusion, local.model, (2, 1, 28, 28), steps, torch.Generator().manual_seed(31),
                            class_labels=[5, 5], guidance_scale=2.0, guidance_interval=(0.5, math.inf))
        assert np.abs(_decoded(_pngs(interval)) - _png_pixels(expected)).max() <= 1
        listed = requests.post(f"{http}/sample", json={**sandal, "num_images": 3, "class_label": ["Sandal", 0, None]},
                               timeout=120)
        assert listed.status_code == 200 and listed.json()["class_labels"] == [5, 0, None], listed.text

        # guided and unguided requests together: each gets the images it gets alone
        batch = [{"num_images": 2, "num_steps": 4, "seed": 41, "class_label": 8, "guidance_scale": 3},
                 {"num_images": 1, "num_steps": 4, "seed": 42, "class_label": 8},
                 {"num_images": 2, "num_steps": 4, "seed": 43}]
        alone = [_decoded(_pngs(requests.post(f"{http}/sample", json=r, timeout=120))) for r in batch]
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            together = list(pool.map(lambda r: requests.post(f"{http}/sample", json=r, timeout=120), batch))
        for request, one, response in zip(batch, alone, together):
            assert np.abs(_decoded(_pngs(response)) - one).max() <= 1, request
        assert np.abs(alone[0][:1] - alone[1]).max() > 1  # another seed and scale: other images

        for body, status in [({"class_label": "Spaceship"}, 422), ({"class_label": 10}, 422),
                             ({"num_images": 2, "class_label": ["Bag", 12]}, 422),
                             ({"num_images": 3, "class_label": ["Bag", "Coat"]}, 422),
                             ({"class_label": "Bag", "guidance_scale": -2}, 422),
                             ({"class_label": "Bag", "guidance_scale": 2, "guidance_interval": [3, 1]}, 422),
                             ({"class_label": "Bag", "guidance_interval": [0.5]}, 422)]:
            bad = requests.post(f"{http}/sample", json={"num_steps": 2, **body}, timeout=120)
            field = next((f for f in ("guidance_interval", "guidance_scale") if f in body), "class_label")
            assert bad.status_code == status and bad.json()["field"] == field, (body, bad.text)
        assert "Spaceship' is not a class of this model" in requests.post(
            f"{http}/sample", json={"class_label": "Spaceship"}, timeout=120).json()["error"]

        # the bound on -log p(x | y): JSON with a name, multipart with an index, the core's numbers
        x = _to_float(test_images[:2])
        reference = local.diffusion.calc_bpd_estimate(with_class_labels(local.model, [5, 5]), x, num_samples=8,
                                                      generator=torch.Generator().manual_seed(4))
        as_json = requests.post(f"{http}/likelihood", json={"pixels": test_images[:2].tolist(), "num_samples": 8,
                                                            "seed": 4, "class_label": "Sandal"}, timeout=120)
        assert as_json.status_code == 200 and as_json.json()["class_labels"] == [5, 5], as_json.text
        bpd = [r["bpd"] for r in as_json.json()["results"]]
        np.testing.assert_allclose(bpd, reference["total_bpd"].numpy(), rtol=1e-4)
        files = [("files", (f"{i}.png", encode_png(img[..., None]), "image/png")) for i, img in enumerate(test_images[:2])]
        form = requests.post(f"{http}/likelihood", files=files, data={"num_samples": "8", "seed": "4", "class_label": "5"},
                             timeout=120)
        assert form.status_code == 200 and [r["bpd"] for r in form.json()["results"]] == bpd, form.text
        unlabelled = requests.post(f"{http}/likelihood", json={"pixels": test_images[:2].tolist(), "num_samples": 8,
                                                               "seed": 4}, timeout=120).json()
        assert unlabelled["class_labels"] is None and [r["bpd"] for r in unlabelled["results"]] != bpd
        bad = requests.post(f"{http}/likelihood", json={"pixels": test_images[:2].tolist(), "class_label": [1]},
                            timeout=120)
        assert bad.status_code == 422 and bad.json()["field"] == "class_label", bad.text
    finally:
        _restore_v1(served, models)
