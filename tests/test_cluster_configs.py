"""Offline checks of the cluster configs: ray_cluster.yaml (Ray cluster launcher, AWS) against Ray's own
schema and rules, and deploy/k8s/{rayjob,rayservice}.yaml: their pod templates against Kubernetes' published
schema, the KubeRay fields around them against the fields the CRD requires, and the embedded Serve config
parsed by Ray Serve's own schema. No cloud access: nothing here launches anything."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import torch
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from pipelines.training.launcher import resolve_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
RAYJOB_YAML = REPO / "deploy" / "k8s" / "rayjob.yaml"
RAYSERVICE_YAML = REPO / "deploy" / "k8s" / "rayservice.yaml"
DOCKERFILE = REPO / "deploy" / "k8s" / "Dockerfile"
SERVE_CONFIG_YAML = REPO / "deploy" / "serve_config.yaml"
SERVE_IMPORT_PATH = "deploy.serve_app:app"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
TORCH_VERSION = torch.__version__.split("+")[0]
PROJECT_DIR_ON_NODES = "~/ray-ddpm"


def _load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return _load(CLUSTER_YAML)


@pytest.fixture(scope="module")
def prepared(cluster: dict[str, Any]) -> dict[str, Any]:
    """The config as `ray up` sees it after merging Ray's AWS defaults (offline part of _bootstrap_config)."""
    return prepare_config(copy.deepcopy(cluster))


def _worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def _docker_envs(config: dict[str, Any]) -> dict[str, str]:
    """`--env NAME=VALUE` entries of the docker run options, as a dict."""
    envs = {}
    for option in config["docker"]["run_options"]:
        match = re.fullmatch(r"--env (\w+)=(\S+)", option)
        if match:
            envs[match.group(1)] = match.group(2)
    return envs


# ---------------------------------------------------------------- ray_cluster.yaml: Ray's schema and rules


def test_cluster_config_passes_rays_own_schema_and_validation(cluster, prepared):
    with open(RAY_SCHEMA) as f:
        schema = json.load(f)
    jsonschema.validate(cluster, schema)  # the file as written
    validate_config(prepared)  # what `ray up` validates, after defaults are merged
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.update(head_node_type="no-such-type"),
        lambda c: c.update(worker_nodes_typo={}),  # unknown top-level key
        lambda c: c["available_node_types"]["head"].pop("resources"),
        lambda c: c["available_node_types"]["gpu_l4x1"].update(min_workers="zero"),
        lambda c: c.update(max_workers=-1) or c["available_node_types"]["gpu_l4x1"].update(min_workers=1),
    ],
    ids=["unknown-head-type", "unknown-key", "no-resources", "non-integer-min", "min-above-global-max"],
)
def test_rays_validation_rejects_broken_variants(cluster, breakage):
    broken = copy.deepcopy(cluster)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(broken))


def test_head_has_no_gpus_and_gpu_workers_autoscale_from_zero(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not re.match(r"^(g|p)\d", head["node_config"]["InstanceType"]), "head must be a CPU instance"
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--num-gpus=0" in head_start

    workers = _worker_types(cluster)
    assert workers, "expected at least one worker node type"
    for name, node_type in workers.items():
        assert node_type["resources"]["GPU"] > 0, name
        assert re.match(r"^(g6|g6e|p5|p5e|p5en)\.", node_type["node_config"]["InstanceType"]), name
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] > 0, name
    assert cluster["max_workers"] >= max(t["max_workers"] for t in workers.values())


def test_setup_commands_install_pinned_torch_then_the_project(cluster, prepared):
    assert cluster["file_mounts"][PROJECT_DIR_ON_NODES] == "."
    for key in ("head_setup_commands", "worker_setup_commands"):  # after merge_setup_commands
        commands = prepared[key]
        torch_idx = [i for i, c in enumerate(commands) if f'"torch=={TORCH_VERSION}"' in c]
        project_idx = [i for i, c in enumerate(commands) if f"pip install --no-cache-dir -e {PROJECT_DIR_ON_NODES}" in c]
        assert len(torch_idx) == 1 and len(project_idx) == 1, (key, commands)
        assert torch_idx[0] < project_idx[0], f"{key}: torch must be installed before the project"


def test_images_match_the_ray_and_python_the_project_uses(cluster):
    requires_python = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    for key in ("head_image", "worker_image"):
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)(-gpu)?", cluster["docker"][key])
        assert match, cluster["docker"][key]
        assert match.group(1) == ray.__version__
        assert f"{match.group(2)}.{match.group(3)}" in requires_python
    assert cluster["docker"]["worker_image"].endswith("-gpu")


def test_token_authentication_is_on_everywhere(cluster, prepared):
    envs = _docker_envs(cluster)
    assert envs["RAY_AUTH_MODE"] == "token"
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    every_command = json.dumps({k: v for k, v in prepared.items() if k.endswith("_commands")})
    assert "RAY_AUTH_MODE=disabled" not in every_command


def test_storage_is_s3_through_instance_profiles(cluster):
    envs = _docker_envs(cluster)
    s3_vars = ["RAY_DDPM_S3_ROOT", "RAY_DDPM_SHARDS", "RAY_DDPM_STORAGE_PATH", "MLFLOW_ARTIFACTS_DESTINATION"]
    root = envs["RAY_DDPM_S3_ROOT"]
    assert re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[\w.-]+)+", root), root
    for name in s3_vars:
        assert envs[name].startswith(root), (name, envs[name])
    for name, node_type in cluster["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"]["Name"], name
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert '--artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"' in head_start
    assert "--backend-store-uri sqlite:////" in head_start  # absolute SQLite path
    # Every node gets the head's MLflow server as its tracking URI.
    assert any("MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in c for c in cluster["worker_setup_commands"])
    assert any("MLFLOW_TRACKING_URI=http://" in c for c in cluster["head_setup_commands"])
    assert "s3://" not in json.dumps(cluster["file_mounts"])


# ---------------------------------------------------------------- KubeRay manifests
# KubeRay publishes its CRD schemas only in its source repository and Helm chart, neither of which
# this project's CI can reach (it installs from package registries only), so no pinned copy is kept.
# Instead, every pod template in the manifests (most of each file) is validated strictly against
# Kubernetes' own published OpenAPI schema (the `kubernetes-validate` package, a PodTemplate per
# template), and the KubeRay fields around them against the schema below, written from the fields
# the CRD requires.

_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {"name": {"type": "string", "minLength": 1}, "image": {"type": "string", "minLength": 1}},
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}},
        }
    },
}
# The RayClusterSpec fields KubeRay (ray.io/v1) requires, from ray-operator/apis/ray/v1/raycluster_types.go
# (fields without `omitempty`): headGroupSpec{template, rayStartParams}; each worker group
# {groupName, minReplicas, maxReplicas, template, rayStartParams}; authOptions.mode in {disabled, token}.
RAY_CLUSTER_SPEC_SCHEMA = {
    "type": "object",
    "required": ["headGroupSpec", "rayVersion"],
    "properties": {
        "rayVersion": {"type": "string"},
        "authOptions": {
            "type": "object",
            "required": ["mode"],
            "properties": {"mode": {"enum": ["disabled", "token"]}},
        },
        "headGroupSpec": {
            "type": "object",
            "required": ["template", "rayStartParams"],
            "properties": {
                "template": _POD_TEMPLATE,
                "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["groupName", "minReplicas", "maxReplicas", "template", "rayStartParams"],
                "properties": {
                    "groupName": {"type": "string", "minLength": 1},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "template": _POD_TEMPLATE,
                    "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
        },
    },
}


def _resource_schema(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            "spec": spec,
        },
    }


RAYJOB_SCHEMA = _resource_schema(
    "RayJob",
    {
        "type": "object",
        "required": ["entrypoint", "rayClusterSpec"],
        "properties": {
            "entrypoint": {"type": "string", "minLength": 1},
            "runtimeEnvYAML": {"type": "string"},
            "shutdownAfterJobFinishes": {"type": "boolean"},
            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
            "rayClusterSpec": RAY_CLUSTER_SPEC_SCHEMA,
        },
    },
)
RAYSERVICE_SCHEMA = _resource_schema(
    "RayService",
    {
        "type": "object",
        "required": ["serveConfigV2", "rayClusterConfig"],
        "properties": {"serveConfigV2": {"type": "string"}, "rayClusterConfig": RAY_CLUSTER_SPEC_SCHEMA},
    },
)


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    """Auth on, Ray version pinned to ours, head without GPUs, GPU worker groups autoscaling from 0."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    assert spec.get("enableInTreeAutoscaling") is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(head.get("resources", {}))
    assert spec["workerGroupSpecs"], "expected a GPU worker group"
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) > 0, group["groupName"]
        assert group["minReplicas"] == 0 and group["maxReplicas"] > 0, group["groupName"]


def test_rayjob_has_the_kuberay_fields_and_runs_training():
    job = _load(RAYJOB_YAML)
    jsonschema.validate(job, RAYJOB_SCHEMA)
    spec = job["spec"]
    command = "python pipelines/train.py --config configs/cifar10_ddpm.yaml"
    assert spec["entrypoint"].startswith(command + " ")
    overrides = spec["entrypoint"][len(command):].split()
    # The overrides are real config keys, and put data and checkpoints on S3 (train.py's own resolution).
    config = resolve_config(str(REPO / "configs" / "cifar10_ddpm.yaml"), overrides)
    assert config.data.shards.startswith("s3://") and config.train.storage_path.startswith("s3://")
    assert config.scaling.use_gpu
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/ray-ddpm"
    cluster_spec = spec["rayClusterSpec"]
    _check_cluster_spec(cluster_spec)
    containers = [cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in cluster_spec["workerGroupSpecs"]]
    for container in containers:  # rank 0 logs to the MLflow server wherever it runs
        envs = {e["name"]: e["value"] for e in container.get("env", [])}
        assert envs["MLFLOW_TRACKING_URI"].startswith("http://"), container["name"]


def test_kuberay_schema_rejects_missing_required_fields():
    job = _load(RAYJOB_YAML)
    for path in (("spec", "entrypoint"), ("spec", "rayClusterSpec", "headGroupSpec", "template")):
        broken = copy.deepcopy(job)
        node = broken
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, RAYJOB_SCHEMA)
    broken = copy.deepcopy(job)
    del broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RAYJOB_SCHEMA)


def _pod_templates(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod template of a RayJob or RayService, by group name ("head" for the head group)."""
    spec = manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in spec.get("workerGroupSpecs", [])})
    return templates


def _validate_pod_template(name: str, template: dict[str, Any]) -> None:
    resource = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
    kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("path", [RAYJOB_YAML, RAYSERVICE_YAML], ids=["rayjob", "rayservice"])
def test_pod_templates_pass_the_kubernetes_schema(path):
    templates = _pod_templates(_load(path))
    assert "head" in templates and len(templates) >= 2
    for name, template in templates.items():
        _validate_pod_template(name, template)
    # the validation is strict: a misspelt or mistyped container field is refused
    head = copy.deepcopy(templates["head"])
    head["spec"]["containers"][0]["imagee"] = head["spec"]["containers"][0].pop("image")
    with pytest.raises(kubernetes_validate.ValidationError, match="imagee"):
        _validate_pod_template("head", head)
    head = copy.deepcopy(templates["head"])
    head["spec"]["containers"][0]["ports"] = [{"containerPort": "6379"}]
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_pod_template("head", head)


def test_dockerfile_builds_on_our_ray_and_torch():
    text = DOCKERFILE.read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray.__version__}-py311-gpu" in text
    assert f"ARG TORCH_SPEC=torch=={TORCH_VERSION}" in text
    assert text.index("TORCH_SPEC}") < text.index("pip install --no-cache-dir .")
    assert "WORKDIR /home/ray/ray-ddpm" in text


def _serve_deploy_config(text: str) -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(yaml.safe_load(text))


def test_rayservice_embeds_a_valid_serve_config_equivalent_to_the_local_one():
    service = _load(RAYSERVICE_YAML)
    jsonschema.validate(service, RAYSERVICE_SCHEMA)
    _check_cluster_spec(service["spec"]["rayClusterConfig"])
    embedded = _serve_deploy_config(service["spec"]["serveConfigV2"])
    local = _serve_deploy_config(SERVE_CONFIG_YAML.read_text())
    assert [a.import_path for a in embedded.applications] == [SERVE_IMPORT_PATH]

    def shape(config: ServeDeploySchema) -> list[tuple[Any, ...]]:
        return [
            (
                a.name,
                a.import_path,
                a.route_prefix,
                sorted(a.args),
                sorted((d.name, sorted(d.user_config or {})) for d in a.deployments),
            )
            for a in config.applications
        ]

    assert shape(embedded) == shape(local)
