"""Ray Serve app: a FastAPI ingress (``DDPMIngress``) bound to the model deployment (``DDPMModel``).

Run it with the YAML (model, limits, batching, autoscaling and resources all live there)::

    serve run deploy/serve_config.yaml            # or, on a running cluster: serve deploy deploy/serve_config.yaml
    serve run deploy.serve_app:app_builder model_uri=models:/ddpm-fashion-mnist/1 max_batch_size=8

Endpoints (errors are always ``{"error": "<field>: <what is wrong>", "field": ...}``: a 4xx for a bad
request, 503 with ``Retry-After`` when the model replica holding the request dies):

* ``POST /sample`` JSON ``SampleRequest`` (sampler "ddpm", "ddim", "pc", "langevin",
  "dpm_solver" or "edm_heun", with its parameters): images as base64 PNGs in JSON, one PNG grid, or an ``.npy``
  (uint8 [N, H, W, C]); the same ``seed`` gives the same images. The JSON answer also carries the
  sampler's resolved parameters and its ``network_evaluations`` per image. A class-conditional model
  takes ``class_label`` (a class index or name, or one per image), ``guidance_scale``
  (classifier-free guidance) and ``guidance_interval`` (guide only a range of noise levels); the answer
  gives ``class_labels`` (the indices), ``guidance_scale`` and the ``guidance_interval`` that acted.
* ``POST /likelihood``: PNG/JPEG uploads (multipart field ``files``; options as form fields) or
  JSON ``{"pixels": uint8 [N, H, W, C] or [N, H, W], "method", "num_samples", "seed",
  "breakdown", "class_label"}``; bits/dim per image (exact bound or stratified estimate with standard
  error), for a class-conditional model given ``class_label`` the bound on -log p(x | y).
* ``GET /healthz``: 200 ``{"status": "ok", ...}`` once a model is loaded.
* ``GET /model``: name, version, alias, MLflow run id, configs, data manifest summary, replica, and
  ``num_classes`` / ``classes`` (``[{"index", "name"}]``; ``null`` for an unconditional model).

With the ingress ``user_config.api_key_env`` naming a set environment variable, every endpoint but
``/healthz`` needs ``Authorization: Bearer <its value>`` (else 401; ``deploy/api_key.py``).

``app`` takes every setting from the YAML ``user_config``s (no model is hard-coded);
``app_builder(args)`` builds the same app from ``key=value`` arguments.

Two things about this module are deliberate: it does not use ``from __future__ import
annotations`` (FastAPI reads the endpoints' annotations, e.g. ``Request``, from the method
globals, and Serve ships the ingress class by value, so string annotations would not resolve),
and every helper the deployments use is defined above them (Serve serializes a deployment class
when it is decorated).
"""

import secrets
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.api_key import configure_api_key, require_api_key
from deploy.config import IngressConfig, ModelDeploymentConfig
from deploy.errors import RequestError, request_error_from_validation
from deploy.http_io import parse_likelihood_request, parse_sample_request, sample_response
from deploy.limits import Limits
from deploy.model_deployment import DDPMModel
from deploy.request_models import MAX_SEED

api = FastAPI(title="DDPM sampling and likelihood", version="1")


@api.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=getattr(err, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    error = request_error_from_validation(err.errors())
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": f"{request.url.path}: {err.detail}", "field": "path"}, status_code=err.status_code,
                        headers=getattr(err, "headers", None))


@api.exception_handler(RayActorError)
async def _replica_lost(_: Request, err: RayActorError) -> JSONResponse:
    """The model replica died or became unreachable while it held the request (Serve replaces it):
    503 with ``Retry-After``, since sending the same request again (same seed) gives the same result."""
    return JSONResponse({"error": f"model: the replica serving this request was lost ({type(err).__name__}); "
                                  "retry the request", "field": "model"}, status_code=503, headers={"Retry-After": "5"})


@api.exception_handler(Exception)
async def _internal_error(_: Request, err: Exception) -> JSONResponse:
    return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}", "field": None}, status_code=500)


def _resolve_seed(seed: int | None) -> int:
    return seed if seed is not None else secrets.randbelow(MAX_SEED + 1)


def _unwrap(result: Any) -> Any:
    """Raise a ``RequestError`` returned by the model deployment; pass anything else through."""
    if isinstance(result, RequestError):
        raise result
    return result


def _model_ref(source: dict[str, Any]) -> dict[str, Any]:
    return {key: source.get(key) for key in ("name", "version", "alias", "run_id", "uri")}


@serve.deployment(name="DDPMIngress", max_ongoing_requests=64)
@serve.ingress(api)
class DDPMIngress:
    """HTTP front end: parses and validates requests (limits from ``user_config``), then calls
    ``DDPMModel``. Holds no model."""

    def __init__(self, model: DeploymentHandle) -> None:
        self._model = model
        self._limits = Limits()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply an ``IngressConfig`` dict (``{"limits": {...}, "api_key_env": ...}``); raises
        pydantic.ValidationError if invalid."""
        config = IngressConfig.model_validate(user_config)
        self._limits = config.limits
        configure_api_key(config.api_key_env)

    @api.post("/sample", dependencies=[Depends(require_api_key)])
    async def sample(self, request: Request) -> Response:
        """Draw images; body: ``deploy.request_models.SampleRequest`` JSON."""
        limits = self._limits
        sample = await parse_sample_request(request, limits)
        seed = _resolve_seed(sample.seed)
        result = _unwrap(await self._model.sample.remote(sample, seed, limits.max_num_steps))
        metadata = {
            "seed": seed, "sampler": sample.sampler, "num_steps": result["num_steps"], "eta": sample.eta,
            **result["settings"], "network_evaluations": result["network_evaluations"],
            "class_labels": result["class_labels"], "guidance_scale": sample.guidance_scale,
            "guidance_interval": result["guidance_interval"],
            "model": _model_ref(result["model"]),
        }
        return sample_response(result["images"], sample.format, metadata)

    @api.post("/likelihood", dependencies=[Depends(require_api_key)])
    async def likelihood(self, request: Request) -> JSONResponse:
        """Bits/dim of uploaded or JSON images; see the module docstring."""
        limits = self._limits
        parsed = await parse_likelihood_request(request, limits)
        seed = _resolve_seed(parsed.options.seed)
        result = _unwrap(await self._model.likelihood.remote(
            parsed.options, parsed.pixels, seed, parsed.images_field, limits.max_num_steps
        ))
        return JSONResponse({
            "unit": "bits/dim", "method": parsed.options.method, "seed": seed, "class_labels": result["class_labels"],
            "num_samples": parsed.options.num_samples if parsed.options.method == "estimate" else None,
            "results": result["results"], "model": _model_ref(result["model"]),
        })

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 with the served model's name/version once a model replica answers, else 503."""
        try:
            info = await self._model.info.remote()
        except Exception as err:  # noqa: BLE001 - any failure means "not healthy"
            return JSONResponse({"error": f"model: not ready: {type(err).__name__}: {err}", "field": "model"},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": _model_ref(info)})

    @api.get("/model", dependencies=[Depends(require_api_key)])
    async def model(self) -> JSONResponse:
        """Everything ``DDPMModel.info`` reports (one replica's view)."""
        return JSONResponse(await self._model.info.remote())



class AppArgs(ModelDeploymentConfig):
    """Arguments of ``app_builder`` (``serve run deploy.serve_app:app_builder key=value ...``): the
    model deployment's ``ModelDeploymentConfig`` fields plus the ingress's request ``limits``
    (defaults of ``Limits``) and ``api_key_env`` (``IngressConfig``). Unlike the YAML user_configs,
    values come as ``key=value`` strings from the command line, so they are coerced
    (``max_batch_size=4``), not taken strictly."""

    model_config = ConfigDict(extra="forbid", strict=False)

    limits: Limits = Limits()
    api_key_env: str | None = None


def app_builder(args: dict[str, Any]) -> Application:
    """Build the app from ``key=value`` arguments (``AppArgs``), e.g. ``model_uri=models:/ddpm/1``.

    Raises:
        pydantic.ValidationError: on unknown keys or bad values.
    """
    parsed = AppArgs.model_validate(args)
    model = DDPMModel.options(user_config=parsed.model_dump(exclude={"limits", "api_key_env"})).bind()
    ingress = IngressConfig(limits=parsed.limits, api_key_env=parsed.api_key_env)
    return DDPMIngress.options(user_config=ingress.model_dump()).bind(model)


app = DDPMIngress.bind(DDPMModel.bind())
"""The app for ``serve run``/``serve deploy`` with ``deploy/serve_config.yaml`` (settings from its user_configs)."""
