"""Deployment targets, checked offline: the Cloud Run service YAML against the Cloud Run Admin API's own
schema and the limits Cloud Run documents, the ECS task definition, service and ALB target group against the
AWS service model itself (botocore's parameter validation of the API inputs, no network), and every manifest
against the image the Dockerfiles build (port, user, health routes of the real app).

Cloud Run, two layers:
1. Structure: the Service schema of the Cloud Run Admin API v1 discovery document (`run.v1.json`, shipped by
   google-api-python-client in googleapiclient/discovery_cache/documents), turned into a JSON Schema:
   every field name and type, unknown fields rejected. The same document's field descriptions state the
   limits used below where they give them (probe ranges, timeoutSeconds below periodSeconds, successThreshold
   1, one port named http1 or h2c, request timeout at most 3600 s).
2. Limits: a JSON Schema written here from the Cloud Run documentation (read 2026-12): "Configure CPU limits"
   (fractional CPU 0.08-1, else 1, 2, 4, 6 or 8; below 1 CPU: concurrency 1 and first generation);
   "Configure memory limits" (1 CPU 128 MiB-4 GiB, 2 CPU 128 MiB-8 GiB, 4 CPU 2-16 GiB, 6 CPU 4-24 GiB, 8 CPU
   4-32 GiB; second generation at least 512 MiB); "Maximum concurrent requests" (1-1000); "Configure container
   health checks" (HTTP/gRPC/TCP startup probes, HTTP/gRPC liveness probes, no exec); "Container runtime
   contract" (PORT, K_SERVICE, K_REVISION, K_CONFIGURATION are reserved; SIGTERM, then SIGKILL 10 s later);
   "Execution environments" (gen1, gen2); "Startup CPU boost"; "Ingress" (all, internal,
   internal-and-cloud-load-balancing); minimum/maximum instances (non-negative integers, as strings).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import botocore.session
import jsonschema
import pytest
import yaml
from botocore.exceptions import ParamValidationError
from botocore.model import Shape
from botocore.validate import validate_parameters

from tests.test_k8s import TARGETS, _kubectl, config, container, one, render

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CLOUDRUN = DEPLOY / "cloudrun-service.yaml"
SHUTDOWN_MARGIN_S = 5
CLOUD_RUN_SIGKILL_AFTER_S = 10
DIGEST = "sha256:" + "0123456789abcdef" * 4
FAKE_IMAGE = f"europe-west4-docker.pkg.dev/my-project/mnist/mnist-serving@{DIGEST}"


# --------------------------------------------------------------------------- the image


def dockerfile_facts(path: Path) -> dict[str, Any]:
    """Port, user, health check and entrypoint of the final stage, with ARG defaults expanded."""
    text = path.read_text()
    final = text[text.rindex("\nFROM ") :]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", final, re.MULTILINE))

    def expand(s: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], s)

    ((expose, grpc),) = re.findall(r"^EXPOSE (\d+) (\d+)$", final, re.MULTILINE)  # HTTP, then gRPC
    (user,) = re.findall(r"^USER (\S+)$", final, re.MULTILINE)
    (health,) = re.findall(r"^\s+CMD (\[.*\])$", final, re.MULTILINE)
    (entrypoint,) = re.findall(r"^ENTRYPOINT (\[.*\])$", final, re.MULTILINE)
    env = dict(re.findall(r"\b(MNIST_\w+)=(\S+)", final))
    uid, gid = expand(user).split(":")
    return {
        "port": int(expose),
        "grpc_port": int(grpc),
        "uid": int(uid),
        "gid": int(gid),
        "healthcheck": json.loads(health),
        "entrypoint": json.loads(entrypoint),
        "env": env,
    }


CPU_IMAGE = dockerfile_facts(ROOT / "Dockerfile")


def healthcheck_route() -> str:
    """The route the image's HEALTHCHECK script asks (deploy/healthcheck.py)."""
    (route,) = re.findall(r'f"http://127\.0\.0\.1:\{port\}(/[a-z]+)"', (DEPLOY / "healthcheck.py").read_text())
    return route


def app_get_routes() -> set[str]:
    """GET routes of the real app, as its OpenAPI document lists them (the app is built as mnist-serve
    builds it; nothing is loaded before the lifespan)."""
    from service.app import create_app
    from service.settings import Settings

    paths = create_app(Settings()).openapi()["paths"]
    return {path for path, ops in paths.items() if "get" in ops}


def test_both_images_agree_and_serve_the_health_routes() -> None:
    gpu = dockerfile_facts(ROOT / "Dockerfile.gpu")
    for key in ("port", "uid", "gid", "healthcheck", "entrypoint"):
        assert gpu[key] == CPU_IMAGE[key], key
    assert CPU_IMAGE["env"]["MNIST_PORT"] == str(CPU_IMAGE["port"])
    assert CPU_IMAGE["uid"] != 0
    assert CPU_IMAGE["healthcheck"][-1] == "/app/healthcheck.py"
    routes = app_get_routes()
    assert {"/healthz", "/readyz", healthcheck_route()} <= routes


@pytest.mark.parametrize("target", TARGETS)
def test_kubernetes_runs_the_image_as_built(target: str) -> None:
    docs = render(target)
    c = container(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == CPU_IMAGE["port"] == int(config(docs)["MNIST_PORT"])
    assert pod["securityContext"]["runAsUser"] == CPU_IMAGE["uid"]
    assert pod["securityContext"]["runAsGroup"] == CPU_IMAGE["gid"]
    routes = app_get_routes()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in routes, probe


# --------------------------------------------------------------------------- Cloud Run


def _probe_fields(max_s: int) -> dict[str, Any]:
    """Probe fields and ranges (run.v1 Probe: startup up to 240 s, liveness up to 3600 s)."""
    return {
        "initialDelaySeconds": {"type": "integer", "minimum": 0, "maximum": max_s},
        "periodSeconds": {"type": "integer", "minimum": 1, "maximum": max_s},
        "timeoutSeconds": {"type": "integer", "minimum": 1, "maximum": 3600},
        "failureThreshold": {"type": "integer", "minimum": 1},
        "successThreshold": {"const": 1},
    }


_HTTP_GET = {
    "type": "object",
    "additionalProperties": False,
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "pattern": "^/"},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "httpHeaders": {"type": "array"},
    },
}
_GRPC = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"port": {"type": "integer"}, "service": {"type": "string"}},
}
_TCP = {"type": "object", "additionalProperties": False, "properties": {"port": {"type": "integer"}}}


def _probe(kinds: dict[str, Any], max_s: int) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {**_probe_fields(max_s), **kinds},
        "minProperties": 1,
        "oneOf": [{"required": [k]} for k in kinds],
    }


_BOOL_STR = {"enum": ["true", "false"]}
_COUNT_STR = {"type": "string", "pattern": "^[0-9]+$"}
_QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(Mi|Gi)?$"}
_ENV_VAR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "not": {"enum": ["PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"]}},
        "value": {"type": "string"},
        "valueFrom": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretKeyRef"],
            "properties": {
                "secretKeyRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "key"],
                    "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                }
            },
        },
    },
    "oneOf": [{"required": ["value"]}, {"required": ["valueFrom"]}],
}
CLOUD_RUN_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.knative.dev/v1"},
        "kind": {"const": "Service"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]{0,47}[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "properties": {
                        "run.googleapis.com/ingress": {
                            "enum": ["all", "internal", "internal-and-cloud-load-balancing"]
                        },
                    },
                },
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["template"],
            "properties": {
                "template": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["spec"],
                    "properties": {
                        "metadata": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                "annotations": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                    "properties": {
                                        "autoscaling.knative.dev/minScale": _COUNT_STR,
                                        "autoscaling.knative.dev/maxScale": _COUNT_STR,
                                        "run.googleapis.com/execution-environment": {"enum": ["gen1", "gen2"]},
                                        "run.googleapis.com/startup-cpu-boost": _BOOL_STR,
                                        "run.googleapis.com/cpu-throttling": _BOOL_STR,
                                    },
                                },
                            },
                        },
                        "spec": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["containers"],
                            "properties": {
                                "containerConcurrency": {"type": "integer", "minimum": 1, "maximum": 1000},
                                "timeoutSeconds": {"type": "integer", "minimum": 1, "maximum": 3600},
                                "serviceAccountName": {"type": "string"},
                                "volumes": {"type": "array"},
                                "containers": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["image"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "image": {"type": "string"},
                                            "command": {"type": "array", "items": {"type": "string"}},
                                            "args": {"type": "array", "items": {"type": "string"}},
                                            "workingDir": {"type": "string"},
                                            "ports": {
                                                "type": "array",
                                                "maxItems": 1,
                                                "items": {
                                                    "type": "object",
                                                    "additionalProperties": False,
                                                    "required": ["containerPort"],
                                                    "properties": {
                                                        "name": {"enum": ["http1", "h2c"]},
                                                        "containerPort": {
                                                            "type": "integer",
                                                            "minimum": 1,
                                                            "maximum": 65535,
                                                        },
                                                    },
                                                },
                                            },
                                            "env": {"type": "array", "items": _ENV_VAR},
                                            "resources": {
                                                "type": "object",
                                                "additionalProperties": False,
                                                "properties": {
                                                    "limits": {
                                                        "type": "object",
                                                        "additionalProperties": False,
                                                        "properties": {"cpu": _QUANTITY, "memory": _QUANTITY},
                                                    }
                                                },
                                            },
                                            "volumeMounts": {"type": "array"},
                                            "startupProbe": _probe(
                                                {"httpGet": _HTTP_GET, "grpc": _GRPC, "tcpSocket": _TCP}, 240
                                            ),
                                            "livenessProbe": _probe({"httpGet": _HTTP_GET, "grpc": _GRPC}, 3600),
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
                "traffic": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "latestRevision": {"type": "boolean"},
                            "revisionName": {"type": "string"},
                            "percent": {"type": "integer", "minimum": 0, "maximum": 100},
                            "tag": {"type": "string"},
                        },
                    },
                },
            },
        },
    },
}
# Memory range (MiB) per whole CPU count ("Configure memory limits").
_MEMORY_RANGE_MIB = {1: (128, 4096), 2: (128, 8192), 4: (2048, 16384), 6: (4096, 24576), 8: (4096, 32768)}


def _mib(quantity: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(Mi|Gi)", quantity)
    assert m, f"memory {quantity!r}: use Mi or Gi"
    return float(m[1]) * (1024 if m[2] == "Gi" else 1)


def _from_discovery(schema: dict[str, Any]) -> dict[str, Any]:
    """One discovery-document schema as JSON Schema (objects closed: unknown fields are errors)."""
    if "$ref" in schema:
        return {"$ref": f"#/$defs/{schema['$ref']}"}
    kind = schema.get("type", "any")
    if kind == "object" and "properties" in schema:
        props = {k: _from_discovery(v) for k, v in schema["properties"].items()}
        return {"type": "object", "properties": props, "additionalProperties": False}
    if kind == "object":
        return {"type": "object", "additionalProperties": _from_discovery(schema.get("additionalProperties", {}))}
    if kind == "array":
        return {"type": "array", "items": _from_discovery(schema["items"])}
    if kind in ("string", "integer", "boolean", "number"):
        out: dict[str, Any] = {"type": kind}
        if "enum" in schema:
            out["enum"] = schema["enum"]
        return out
    return {}


def cloud_run_api_schema() -> dict[str, Any]:
    """The Service of the Cloud Run Admin API v1, from its discovery document (no network)."""
    import importlib.resources

    path = importlib.resources.files("googleapiclient") / "discovery_cache" / "documents" / "run.v1.json"
    discovery = json.loads(path.read_text())
    assert (discovery["name"], discovery["version"]) == ("run", "v1")
    defs = {name: _from_discovery(schema) for name, schema in discovery["schemas"].items()}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": defs, "$ref": "#/$defs/Service"}


_API_VALIDATOR = jsonschema.Draft202012Validator(cloud_run_api_schema())
_LIMITS_VALIDATOR = jsonschema.Draft202012Validator(CLOUD_RUN_SCHEMA)


def cloudrun_problems(doc: dict[str, Any]) -> list[str]:
    """Everything wrong with a Cloud Run service document: the API's schema, then the documented limits."""
    problems = [f"API: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _API_VALIDATOR.iter_errors(doc)]
    problems += [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _LIMITS_VALIDATOR.iter_errors(doc)]
    if problems:
        return problems
    template = doc["spec"]["template"]
    annotations = template.get("metadata", {}).get("annotations", {})
    spec = template["spec"]
    gen = annotations.get("run.googleapis.com/execution-environment", "gen1")
    concurrency = spec.get("containerConcurrency", 80)
    lo, hi = annotations.get("autoscaling.knative.dev/minScale"), annotations.get("autoscaling.knative.dev/maxScale")
    if lo is not None and hi is not None and int(lo) > int(hi):
        problems.append(f"minScale {lo} > maxScale {hi}")
    for c in spec["containers"]:
        limits = c.get("resources", {}).get("limits", {})
        cpu = float(limits.get("cpu", "1"))
        memory = _mib(limits.get("memory", "512Mi"))
        if cpu < 1:
            if cpu < 0.08:
                problems.append(f"cpu {cpu} < 0.08")
            if concurrency != 1:
                problems.append("below 1 CPU, containerConcurrency must be 1")
            if gen != "gen1":
                problems.append("below 1 CPU, the execution environment must be gen1")
            if memory > (512 if cpu < 0.5 else 1024):
                problems.append(f"{memory} MiB needs more than {cpu} CPU")
        elif cpu not in _MEMORY_RANGE_MIB:
            problems.append(f"cpu {cpu}: whole CPUs are 1, 2, 4, 6 or 8")
        else:
            low, high = _MEMORY_RANGE_MIB[int(cpu)]
            if not low <= memory <= high:
                problems.append(f"{memory} MiB outside {low}-{high} MiB for {int(cpu)} CPU")
        if gen == "gen2" and memory < 512:
            problems.append(f"gen2 needs at least 512 MiB, got {memory}")
        for name in ("startupProbe", "livenessProbe"):
            probe = c.get(name)
            if probe is None:
                continue
            if probe.get("timeoutSeconds", 1) >= probe.get("periodSeconds", 10):
                problems.append(f"{name}: timeoutSeconds must be smaller than periodSeconds")
    return problems


def cloudrun_doc() -> dict[str, Any]:
    from deploy.cloudrun_render import render as render_cloudrun

    text = render_cloudrun(CLOUDRUN.read_text(), image=FAKE_IMAGE, project="my-project", region="europe-west4")
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


def _cloudrun_container(doc: dict[str, Any]) -> dict[str, Any]:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def _cloudrun_env(doc: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _cloudrun_container(doc).get("env", [])}


def test_cloudrun_service_follows_the_documented_fields_and_limits() -> None:
    doc = cloudrun_doc()
    assert cloudrun_problems(doc) == []
    annotations = doc["spec"]["template"]["metadata"]["annotations"]
    assert annotations["run.googleapis.com/execution-environment"] == "gen2"
    assert annotations["run.googleapis.com/startup-cpu-boost"] == "true"
    assert int(annotations["autoscaling.knative.dev/minScale"]) >= 1
    assert int(annotations["autoscaling.knative.dev/maxScale"]) >= int(annotations["autoscaling.knative.dev/minScale"])
    # A dedicated service account in the deployed project.
    assert doc["spec"]["template"]["spec"]["serviceAccountName"] == "mnist-serving@my-project.iam.gserviceaccount.com"
    assert doc["metadata"]["namespace"] == "my-project"
    assert doc["metadata"]["labels"]["cloud.googleapis.com/location"] == "europe-west4"
    assert _cloudrun_container(doc)["image"] == FAKE_IMAGE


def test_cloudrun_api_schema_is_the_real_one() -> None:
    """The discovery document's Service schema, on its own, knows the fields (and rejects a typo)."""
    schema = cloud_run_api_schema()
    assert {"containerConcurrency", "timeoutSeconds", "serviceAccountName", "containers"} <= set(
        schema["$defs"]["RevisionSpec"]["properties"]
    )
    assert list(_API_VALIDATOR.iter_errors(cloudrun_doc())) == []
    typo = {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "x"},
            "spec": {"template": {"spec": {"containers": [{"imag": "x"}]}}}}  # fmt: skip
    assert [e.message for e in _API_VALIDATOR.iter_errors(typo)] == [
        "Additional properties are not allowed ('imag' was unexpected)"
    ]


def test_cloudrun_runs_the_image_as_built() -> None:
    doc = cloudrun_doc()
    c = _cloudrun_container(doc)
    env = _cloudrun_env(doc)
    ((port,),) = [[p["containerPort"] for p in c["ports"]]]
    assert port == CPU_IMAGE["port"] == int(env["MNIST_PORT"])
    assert c["ports"][0]["name"] == "http1"
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert {"/readyz", "/healthz"} <= app_get_routes()
    # One port only on Cloud Run: the gRPC front-end is off.
    assert env["MNIST_GRPC_PORT"] == "0"
    assert env["MNIST_PROVIDER"] == "cpu"


def test_cloudrun_drains_within_the_grace_period_and_sizes_match_the_batcher() -> None:
    doc = cloudrun_doc()
    env = _cloudrun_env(doc)
    spec = doc["spec"]["template"]["spec"]
    # SIGTERM, then SIGKILL 10 s later: the drain must end before.
    assert float(env["MNIST_DRAIN_TIMEOUT_S"]) + 1 <= CLOUD_RUN_SIGKILL_AFTER_S
    # Cloud Run's request timeout above the service's own, so the service's 504 (JSON) is what clients get.
    assert spec["timeoutSeconds"] > float(env["MNIST_REQUEST_TIMEOUT_S"])
    # Concurrency: enough requests in flight to form batches, never more than one batch can take.
    assert 8 <= spec["containerConcurrency"] <= int(env["MNIST_MAX_BATCH_SIZE"])
    # One inference thread per CPU of the limit.
    limits = _cloudrun_container(doc)["resources"]["limits"]
    assert int(env["MNIST_INTRA_OP_THREADS"]) <= float(limits["cpu"])


def test_cloudrun_holds_no_secret() -> None:
    doc = cloudrun_doc()
    secretish = re.compile(r"TOKEN|SECRET|PASSWORD|KEY|CREDENTIAL", re.IGNORECASE)
    env = _cloudrun_container(doc)["env"]
    names = set()
    for e in env:
        if secretish.search(e["name"]):
            assert "value" not in e, f"{e['name']} must come from Secret Manager"
            names.add(e["name"])
    assert "MNIST_ADMIN_TOKEN" in names
    admin = next(e for e in env if e["name"] == "MNIST_ADMIN_TOKEN")
    assert (
        admin["valueFrom"]["secretKeyRef"]["key"] in ("latest",) or admin["valueFrom"]["secretKeyRef"]["key"].isdigit()
    )


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value

    return mutate


def _annotation(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["spec"]["template"]["metadata"]["annotations"][key] = value

    return mutate


_C = "spec.template.spec.containers.0"
CLOUDRUN_BREAKAGES = {
    "concurrency above 1000": _set("spec.template.spec.containerConcurrency", 2000),
    "request timeout above 3600 s": _set("spec.template.spec.timeoutSeconds", 7200),
    "3 CPUs": _set(f"{_C}.resources.limits.cpu", "3"),
    "16 GiB on 1 CPU": _set(f"{_C}.resources.limits.memory", "16Gi"),
    "gen2 with 256 MiB": _set(f"{_C}.resources.limits.memory", "256Mi"),
    "half a CPU with concurrency 64": _set(f"{_C}.resources.limits.cpu", "0.5"),
    "a second port": _set(f"{_C}.ports", [{"containerPort": 8000}, {"containerPort": 8001}]),
    "port name grpc": _set(f"{_C}.ports.0.name", "grpc"),
    "reserved PORT variable": _set(f"{_C}.env.0.name", "PORT"),
    "probe timeout not below its period": _set(f"{_C}.livenessProbe.timeoutSeconds", 10),
    "startup probe period above 240 s": _set(f"{_C}.startupProbe.periodSeconds", 300),
    "exec probe (not supported)": _set(f"{_C}.livenessProbe", {"exec": {"command": ["true"]}}),
    "unknown container field": _set(f"{_C}.securityContexts", {}),
    "concurrency as a string": _set("spec.template.spec.containerConcurrency", "64"),
    "env value as a number": _set(f"{_C}.env.0.value", 8000),
    "TCP liveness probe": _set(f"{_C}.livenessProbe", {"tcpSocket": {"port": 8000}}),
    "unknown execution environment": _annotation("run.googleapis.com/execution-environment", "gen3"),
    "minScale above maxScale": _annotation("autoscaling.knative.dev/minScale", "50"),
    "boolean instead of string annotation": _annotation("run.googleapis.com/startup-cpu-boost", True),
}


@pytest.mark.parametrize("breakage", CLOUDRUN_BREAKAGES)
def test_cloudrun_check_rejects_a_broken_copy(breakage: str) -> None:
    doc = cloudrun_doc()
    CLOUDRUN_BREAKAGES[breakage](doc)
    assert cloudrun_problems(doc), breakage


def test_cloudrun_render_refuses_a_tag_and_bad_names() -> None:
    from deploy.cloudrun_render import render as render_cloudrun

    template = CLOUDRUN.read_text()
    for match, kwargs in (
        ("image must be", {"image": "europe-west4-docker.pkg.dev/p/r/mnist-serving:1.0.0", "project": "my-project",
                           "region": "europe-west4"}),
        ("project ID", {"image": FAKE_IMAGE, "project": "My_Project", "region": "europe-west4"}),
        ("region", {"image": FAKE_IMAGE, "project": "my-project", "region": "Europe"}),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            render_cloudrun(template, **kwargs)
    # The command line: exit 2 and nothing on stdout when refused.
    proc = subprocess.run(
        ["python3", str(DEPLOY / "cloudrun_render.py"), "--image", "x:latest", "--project", "my-project",
         "--region", "europe-west4"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""


# --------------------------------------------------------------------------- ECS (botocore's service model)

_session = botocore.session.get_session()


def _enum_problems(value: Any, shape: Shape, where: str) -> list[str]:
    """botocore's validator checks types, required members and ranges; this adds the enums of the model."""
    problems: list[str] = []
    if shape.type_name == "structure" and isinstance(value, dict):
        for key, sub in value.items():
            if key in shape.members:
                problems += _enum_problems(sub, shape.members[key], f"{where}.{key}")
    elif shape.type_name == "list" and isinstance(value, list):
        for i, sub in enumerate(value):
            problems += _enum_problems(sub, shape.member, f"{where}[{i}]")
    elif shape.type_name == "string" and shape.enum and value not in shape.enum:
        problems.append(f"{where}: {value!r} not one of {shape.enum}")
    return problems


def aws_problems(service: str, operation: str, params: dict[str, Any]) -> list[str]:
    shape = _session.get_service_model(service).operation_model(operation).input_shape
    problems: list[str] = []
    try:
        validate_parameters(params, shape)
    except ParamValidationError as exc:
        problems.append(str(exc))
    return problems + _enum_problems(params, shape, operation)


def _json(name: str) -> dict[str, Any]:
    doc = json.loads((DEPLOY / name).read_text())
    assert isinstance(doc, dict)
    return doc


ECS_FILES = {
    "ecs-task-definition.json": ("ecs", "RegisterTaskDefinition"),
    "ecs-service.json": ("ecs", "CreateService"),
    "ecs-target-group.json": ("elbv2", "CreateTargetGroup"),
    "ecs-target-group-attributes.json": ("elbv2", "ModifyTargetGroupAttributes"),
}


@pytest.mark.parametrize("name", ECS_FILES)
def test_aws_inputs_validate_against_the_service_model(name: str) -> None:
    service, operation = ECS_FILES[name]
    assert aws_problems(service, operation, _json(name)) == []


ECS_BREAKAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown field": lambda t: t["containerDefinitions"][0].__setitem__("stopTimeoutSeconds", 30),
    "stopTimeout as a string": lambda t: t["containerDefinitions"][0].__setitem__("stopTimeout", "30"),
    "no family": lambda t: t.pop("family"),
    "bad network mode": lambda t: t.__setitem__("networkMode", "vpc"),
    "bad protocol": lambda t: t["containerDefinitions"][0]["portMappings"][0].__setitem__("protocol", "http"),
    "bad log driver": lambda t: t["containerDefinitions"][0]["logConfiguration"].__setitem__("logDriver", "cloudwatch"),
}


@pytest.mark.parametrize("breakage", ECS_BREAKAGES)
def test_ecs_check_rejects_a_broken_task_definition(breakage: str) -> None:
    task = _json("ecs-task-definition.json")
    broken = copy.deepcopy(task)
    ECS_BREAKAGES[breakage](broken)
    assert aws_problems("ecs", "RegisterTaskDefinition", broken), breakage


def _ecs_container() -> dict[str, Any]:
    (c,) = _json("ecs-task-definition.json")["containerDefinitions"]
    return c  # type: ignore[no-any-return]


def test_ecs_task_definition_is_true_to_the_image() -> None:
    task = _json("ecs-task-definition.json")
    c = _ecs_container()
    assert task["requiresCompatibilities"] == ["FARGATE"]
    assert task["networkMode"] == "awsvpc"
    # Fargate: task-level cpu/memory in a valid pair (1 vCPU: 2-8 GiB), one inference thread per vCPU.
    cpu, memory = int(task["cpu"]), int(task["memory"])
    assert (cpu, 2048 <= memory <= 8192) == (1024, True)
    env = {e["name"]: e["value"] for e in c["environment"]}
    assert int(env["MNIST_INTRA_OP_THREADS"]) <= cpu // 1024
    assert task["executionRoleArn"].startswith("arn:aws:iam::"), "awslogs, ECR pulls and secrets need it"
    assert c["essential"] is True
    assert c["user"] == f"{CPU_IMAGE['uid']}:{CPU_IMAGE['gid']}"
    assert c["readonlyRootFilesystem"] is True
    assert c["privileged"] is False
    assert c["linuxParameters"]["capabilities"]["drop"] == ["ALL"]
    ports = {p["name"]: p for p in c["portMappings"]}
    assert ports["http"]["containerPort"] == CPU_IMAGE["port"] == int(env["MNIST_PORT"])
    assert ports["grpc"]["containerPort"] == int(env["MNIST_GRPC_PORT"]) == 8001
    assert ports["grpc"]["appProtocol"] == "grpc"
    # The image's own HEALTHCHECK, which asks a real route.
    assert c["healthCheck"]["command"] == ["CMD", *CPU_IMAGE["healthcheck"]]
    assert healthcheck_route() in app_get_routes()
    assert c["healthCheck"]["startPeriod"] >= 10
    # Logs: awslogs with what it needs.
    log = c["logConfiguration"]
    assert log["logDriver"] == "awslogs"
    assert {"awslogs-group", "awslogs-region", "awslogs-stream-prefix"} <= log["options"].keys()
    # /tmp, from a task volume, is the only writable path.
    (mount,) = c["mountPoints"]
    assert mount["containerPath"] == "/tmp"
    assert mount["sourceVolume"] in {v["name"] for v in task["volumes"]}
    # SIGTERM -> drain -> exit within stopTimeout (Fargate allows up to 120 s).
    assert float(env["MNIST_DRAIN_TIMEOUT_S"]) + SHUTDOWN_MARGIN_S <= c["stopTimeout"] <= 120
    # The same settings as the Kubernetes base.
    assert env == config(render("base"))
    # No secret in the file: the admin token is a Secrets Manager reference.
    assert "MNIST_ADMIN_TOKEN" not in env
    (secret,) = c["secrets"]
    assert secret["name"] == "MNIST_ADMIN_TOKEN"
    assert secret["valueFrom"].startswith("arn:aws:secretsmanager:")


def test_ecs_service_sits_behind_the_alb_and_drains() -> None:
    task = _json("ecs-task-definition.json")
    c = _ecs_container()
    env = {e["name"]: e["value"] for e in c["environment"]}
    service = _json("ecs-service.json")
    tg = _json("ecs-target-group.json")
    attrs = {a["Key"]: a["Value"] for a in _json("ecs-target-group-attributes.json")["Attributes"]}
    # The service runs this task family and registers the HTTP port of this container.
    assert service["taskDefinition"] == task["family"]
    (lb,) = service["loadBalancers"]
    assert lb["containerName"] == c["name"]
    assert lb["containerPort"] == CPU_IMAGE["port"]
    assert service["launchType"] == "FARGATE"
    assert service["networkConfiguration"]["awsvpcConfiguration"]["assignPublicIp"] == "DISABLED"
    # A failed rollout stops and rolls back; capacity never drops during one.
    assert service["deploymentConfiguration"]["deploymentCircuitBreaker"] == {"enable": True, "rollback": True}
    assert service["deploymentConfiguration"]["minimumHealthyPercent"] == 100
    assert service["desiredCount"] >= 2
    assert service["healthCheckGracePeriodSeconds"] >= c["healthCheck"]["startPeriod"]
    # Target group: awsvpc tasks are registered by IP, health-checked on /readyz (503 while warming or draining).
    assert tg["TargetType"] == "ip"
    assert tg["Port"] == CPU_IMAGE["port"]
    assert tg["Protocol"] == "HTTP"
    assert tg["HealthCheckPath"] == "/readyz"
    assert tg["HealthCheckPath"] in app_get_routes()
    assert tg["Matcher"]["HttpCode"] == "200"
    assert tg["HealthCheckTimeoutSeconds"] < tg["HealthCheckIntervalSeconds"]
    # ECS deregisters a task and waits the deregistration delay before SIGTERM: long enough for every request
    # the ALB already sent to finish (request timeout), and the drain after it fits in stopTimeout.
    delay = int(attrs["deregistration_delay.timeout_seconds"])
    assert float(env["MNIST_REQUEST_TIMEOUT_S"]) <= delay <= float(env["MNIST_DRAIN_TIMEOUT_S"])
    assert float(env["MNIST_DRAIN_TIMEOUT_S"]) + SHUTDOWN_MARGIN_S <= c["stopTimeout"]


# --------------------------------------------------------------------------- GKE pinning (CI's deploy step)


def test_kustomize_pin_sets_the_digest_that_kubectl_renders(tmp_path: Path) -> None:
    from deploy.kustomize_pin import pin

    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "gke"
    image = f"europe-west4-docker.pkg.dev/my-project/mnist/mnist-serving-gpu@{DIGEST}"
    proc = subprocess.run(["python3", str(DEPLOY / "kustomize_pin.py"), str(overlay), image],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run([_kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert container(docs)["image"] == image
    # A tag is refused, and so is a kustomization without the entry.
    with pytest.raises(ValueError, match="image must be"):
        pin((overlay / "kustomization.yaml").read_text(), "europe-west4-docker.pkg.dev/p/r/mnist-serving-gpu:1.0.0")
    with pytest.raises(ValueError, match="found 0"):
        pin("resources: [../../base]\n", image)
