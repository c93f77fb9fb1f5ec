"""``user_config`` models of the two Serve deployments (no Ray).

``ModelDeploymentConfig`` configures the model deployment (``DDPMModel``: model, batching, how the
network runs), ``IngressConfig`` the HTTP ingress (``DDPMIngress``: request limits, API key). Both
are strict pydantic models: an unknown key or a bad value is refused when Serve applies the YAML.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from deploy.limits import Limits
from deploy.request_models import STRICT
from diffusion_core.inference_network import NetworkMode
from diffusion_core.validation import check_choice

DEFAULT_NETWORK: NetworkMode = "exported"
"""The model deployment's ``network`` when ``user_config`` omits it: ``torch.export`` + ``torch.compile``
sampled fastest on a one-CPU replica with "compiled" (1.16x eager each, "padded" 1.11x), steadiest
across rounds, and builds in seconds where "compiled" takes about 3x and "padded" about 20x as long
(``bench_serve.py --compare-networks``, ``benchmarks/results/bench_serve_networks.json``)."""


class ModelDeploymentConfig(BaseModel):
    """``user_config`` of the model deployment (``DDPMModel``); changing it reconfigures replicas in place.

    Attributes:
        model_uri: ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/<id>/model``,
            ``s3://bucket/prefix`` or a local checkpoint folder (``fetch_checkpoint``).
        max_batch_size: most requests one ``@serve.batch`` call merges (per endpoint).
        batch_wait_timeout_s: how long a batch waits for more requests after its first one; long
            enough for requests that reach the replica one by one through the ingress to fill a
            batch, at the cost of that much more latency for a lone request (docs/serving.md, "Batching and throughput").
        network: how the replica runs the UNet (``diffusion_core.inference_network``): "eager",
            "compiled" (``torch.compile`` with a dynamic batch size), "padded" (``torch.compile`` on
            the batch sizes 1, 2, 4, 8, batches padded up to them) or "exported" (``torch.export`` +
            ``torch.compile``); default ``DEFAULT_NETWORK``. Compiled modes compile when the model
            loads. A change reloads the model.

    Raises:
        pydantic.ValidationError (a ``ValueError``): on a bad value, naming the field; for
            ``network`` (e.g. "torchscript") the message lists the allowed modes.
    """

    model_config = STRICT

    model_uri: str = Field(min_length=1)
    max_batch_size: int = Field(8, gt=0)
    batch_wait_timeout_s: float = Field(0.1, ge=0.0)
    network: NetworkMode = DEFAULT_NETWORK

    @field_validator("network", mode="before")
    @classmethod
    def _known_network(cls, value: Any) -> Any:
        check_choice("network", value, NetworkMode)
        return value


class IngressConfig(BaseModel):
    """``user_config`` of the HTTP ingress deployment (``DDPMIngress``): the request ``limits``, and
    ``api_key_env``, the environment variable of the replica holding the API key that every endpoint
    but ``/healthz`` then requires (``deploy/api_key.py``; unset or empty variable: no key)."""

    model_config = STRICT

    limits: Limits = Limits()
    api_key_env: str | None = Field(None, min_length=1)

