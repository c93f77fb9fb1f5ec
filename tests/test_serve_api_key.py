"""The HTTP API's optional key (``deploy/api_key.py``): the check itself, and over real HTTP on a
private Serve cluster whose ingress reads the key from ``DDPM_API_KEY`` (runtime_env env_vars)."""

from __future__ import annotations

import asyncio
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from _serve_helpers import read_idx_images, save_tiny_checkpoint
from fastapi.security import HTTPAuthorizationCredentials

from deploy.api_key import ApiKeyError, configure_api_key, require_api_key
from deploy.config import IngressConfig
from tooling.local_cluster import SERVE_CONFIG, LocalRayCluster, derive_serve_config

KEY = "s3cret-key-for-tests"


def _bearer(value: str) -> HTTPAuthorizationCredentials:
    return HTTPAuthorizationCredentials(scheme="Bearer", credentials=value)


def test_the_key_check(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        monkeypatch.delenv("DDPM_API_KEY", raising=False)
        assert configure_api_key("DDPM_API_KEY") is False  # unset: open
        asyncio.run(require_api_key(None))
        monkeypatch.setenv("DDPM_API_KEY", "")
        assert configure_api_key("DDPM_API_KEY") is False  # empty: open
        assert configure_api_key(None) is False
        monkeypatch.setenv("DDPM_API_KEY", KEY)
        assert configure_api_key("DDPM_API_KEY") is True
        asyncio.run(require_api_key(_bearer(KEY)))
        for credentials in (None, _bearer(KEY + "x"), _bearer(KEY[:-1]), _bearer("")):
            with pytest.raises(ApiKeyError) as caught:
                asyncio.run(require_api_key(credentials))
            err = caught.value
            assert (err.status, err.field) == (401, "Authorization")
            assert err.body()["error"].startswith("Authorization: ")
            assert err.headers == {"WWW-Authenticate": "Bearer"}
        copy = pickle.loads(pickle.dumps(err))
        assert (type(copy), copy.args) == (ApiKeyError, err.args)
    finally:
        configure_api_key(None)


def test_the_shipped_config_names_the_variable() -> None:
    ingress = {d["name"]: d for d in yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["deployments"]}
    assert IngressConfig.model_validate(ingress["DDPMIngress"]["user_config"]).api_key_env == "DDPM_API_KEY"


def test_the_error_handler_sends_www_authenticate() -> None:
    from deploy.serve_app import _request_error

    response = asyncio.run(_request_error(None, ApiKeyError("missing")))
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert json.loads(response.body) == {"error": "Authorization: missing", "field": "Authorization"}


# ----------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Iterator[str]:
    """A private cluster serving a tiny checkpoint with ``DDPM_API_KEY=KEY`` in the app's runtime_env;
    yields its Serve URL."""
    root = tmp_path_factory.mktemp("api-key")
    checkpoint = save_tiny_checkpoint(root / "ckpt", fashion_mnist_dir, steps=2)
    cluster = LocalRayCluster(num_cpus=2)
    try:
        config = derive_serve_config(f"sqlite:///{root / 'mlflow.db'}", cluster, str(checkpoint), limits={})
        config["applications"][0]["runtime_env"]["env_vars"]["DDPM_API_KEY"] = KEY
        cluster.serve_deploy(config, root / "serve_config.yaml")
        cluster.wait_healthy(timeout_s=300)  # /healthz needs no key
        yield cluster.http
    finally:
        cluster.stop()


def _assert_unauthorized(response: requests.Response) -> None:
    assert response.status_code == 401, (response.status_code, response.text[:300])
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "field"} and body["field"] == "Authorization", body
    assert body["error"].startswith("Authorization: "), body


@pytest.mark.slow
def test_every_endpoint_but_healthz_needs_the_key(keyed: str, fashion_mnist_dir: Path) -> None:
    http = keyed
    pixels = read_idx_images(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz", 2).tolist()
    requests_by_endpoint = {
        "sample": lambda headers: requests.post(f"{http}/sample", json={"num_images": 1, "num_steps": 2, "seed": 1},
                                                headers=headers, timeout=120),
        "likelihood": lambda headers: requests.post(f"{http}/likelihood",
                                                    json={"pixels": pixels, "num_samples": 2, "seed": 1},
                                                    headers=headers, timeout=120),
        "model": lambda headers: requests.get(f"{http}/model", headers=headers, timeout=60),
    }
    wrong_headers = ({}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"},
                     {"Authorization": KEY})
    for name, send in requests_by_endpoint.items():
        for headers in wrong_headers:
            _assert_unauthorized(send(headers))
        accepted = send({"Authorization": f"Bearer {KEY}"})
        assert accepted.status_code == 200, (name, accepted.status_code, accepted.text[:500])
    # a bad request with the key still gets its usual 4xx; without the key, the 401 comes first
    bad = {"num_images": 0}
    assert requests.post(f"{http}/sample", json=bad, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=60).status_code == 422
    _assert_unauthorized(requests.post(f"{http}/sample", json=bad, timeout=60))
    health = requests.get(f"{http}/healthz", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert np.isfinite([r["bpd"] for r in requests_by_endpoint["likelihood"](
        {"Authorization": f"Bearer {KEY}"}).json()["results"]]).all()
