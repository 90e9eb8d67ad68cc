"""MLflow as the model registry, against a real ``mlflow server`` on 127.0.0.1 with a temporary store:
export registers a version (with aliases), ``mnist-pull`` brings a version or alias back into a local model
repository, checked exactly as the service checks a version, ready to promote or hot-load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from export.mlflow_models import PullError, artifact_path, pull, register
from export.mlflow_models import main as pull_main
from service.model import load_model
from service.repository import promoted_version
from service.settings import Settings
from tests.helpers import free_port, running_server, tiny_onnx, write_model

FIXTURE = Path(__file__).parent / "fixtures" / "mnist_small.npz"
MLFLOW = Path(sys.executable).parent / "mlflow"


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite backend, local artifact store) for this module only."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("wb")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start:\n" + (root / "server.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(timeout=10)  # its graceful shutdown waits for idle keep-alive clients; no need here
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def tracking(mlflow_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    return mlflow_url


def _client() -> Any:
    from training.tracking import client

    return client()


def publish(folder: Path, registered_name: str, aliases: tuple[str, ...] = ()) -> str:
    """What mnist-export does after writing a version: log its files to a run, register them. Returns the
    registered version number."""
    client = _client()
    experiment = client.get_experiment_by_name("registry-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("registry-tests")
    run_id = client.create_run(experiment_id).info.run_id
    meta = json.loads((folder / "metadata.json").read_text())
    for path in sorted(folder.iterdir()):
        client.log_artifact(run_id, str(path), artifact_path=artifact_path(meta["version"]))
    client.set_terminated(run_id)
    return register(run_id, meta, registered_name, aliases).version


def test_pull_by_alias_then_promote_and_serve(tracking: str, tmp_path: Path) -> None:
    source = write_model(tmp_path / "exported", "tiny", "1", seed=1)
    registered = publish(source, "tiny-a", ("champion",))
    repo = tmp_path / "models"

    pulled = pull("tiny-a", repo, alias="champion")
    assert (pulled.folder, pulled.already_present) == (repo / "tiny" / "1", False)
    assert pulled.registered.version == registered
    assert "champion" in pulled.registered.aliases
    assert (pulled.folder / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()
    meta = json.loads((pulled.folder / "metadata.json").read_text())
    assert meta["mlflow_registered_model"] == {"name": "tiny-a", "version": registered, "alias": "champion"}
    assert load_model(pulled.folder, Settings(provider="cpu")).version == "1"
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1"]  # no staging folder left
    assert pull("tiny-a", repo, version=registered).already_present

    # A second version, pulled and promoted from the command line; the service then serves it.
    publish(write_model(tmp_path / "exported", "tiny", "2", seed=2), "tiny-a", ("champion",))
    assert pull_main(["tiny-a", "--alias", "champion", "--repository", str(repo), "--promote"]) == 0
    assert promoted_version(repo, "tiny") == "2"
    with running_server(repo, tmp_path) as srv, srv.client() as c:
        assert c.get("/readyz").json()["version"] == "2"


def test_pull_prints_what_to_do_next(tracking: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publish(write_model(tmp_path / "exported", "tiny", "1", seed=3), "tiny-b", ("staging",))
    repo = tmp_path / "models"
    assert pull_main(["tiny-b", "--alias", "staging", "--repository", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "pulled and checked" in out
    assert f"mnist-promote --repository {repo} --name tiny 1" in out
    assert "/admin/models/tiny/versions/1/load" in out
    assert promoted_version(repo, "tiny") is None


def _tampered(folder: Path, how: str) -> None:
    meta = json.loads((folder / "metadata.json").read_text())
    if how == "other bytes":
        (folder / "model.onnx").write_bytes(tiny_onnx(9))  # the recorded sha256 is the old file's
    elif how == "no sha256":
        del meta["sha256"]
    elif how == "file outside":
        meta["file"] = "/dev/zero"
    elif how == "bad golden":
        meta["golden"]["labels"] = [(v + 1) % 10 for v in meta["golden"]["labels"]]
    elif how == "bad reference":
        meta["reference"]["mean_intensity_edges"] = "0..1"
    (folder / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("other bytes", "does not match metadata"),
        ("no sha256", "lacks required keys: ['sha256']"),
        ("file outside", "must be a file name inside the version folder"),
        ("bad golden", "golden inputs give the wrong label"),
        ("bad reference", "mean_intensity_edges must be a list of numbers"),
    ],
)
def test_a_bad_registered_version_is_refused_and_leaves_nothing(
    tracking: str, tmp_path: Path, how: str, message: str
) -> None:
    folder = write_model(tmp_path / "exported", "tiny", "1", seed=4)
    _tampered(folder, how)
    version = publish(folder, "tiny-c")
    repo = tmp_path / "models"
    with pytest.raises(PullError, match="refused") as info:
        pull("tiny-c", repo, version=version)
    assert message in str(info.value)
    assert not (repo / "tiny").exists() or list((repo / "tiny").iterdir()) == []


def test_unknown_versions_and_aliases_are_clear_errors(
    tracking: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(write_model(tmp_path / "exported", "tiny", "1", seed=5), "tiny-d")
    assert pull_main(["tiny-d", "--alias", "nope", "--repository", str(tmp_path)]) == 1
    assert "has no alias 'nope' of the registered model 'tiny-d'" in capsys.readouterr().err
    assert pull_main(["tiny-d", "--version", "99", "--repository", str(tmp_path)]) == 1
    assert "has no version 99" in capsys.readouterr().err
    assert pull_main(["missing-model", "--version", "1", "--repository", str(tmp_path)]) == 1
    assert "mnist-pull: error:" in capsys.readouterr().err


def test_a_taken_local_version_needs_another_number(tracking: str, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "tiny", "1", seed=6)
    version = publish(write_model(tmp_path / "exported", "tiny", "1", seed=7), "tiny-e")
    with pytest.raises(PullError, match="already exists with another model"):
        pull("tiny-e", repo, version=version)
    pulled = pull("tiny-e", repo, version=version, local_version="5")
    assert pulled.folder == repo / "tiny" / "5"
    assert json.loads((pulled.folder / "metadata.json").read_text())["version"] == "5"
    assert load_model(pulled.folder, Settings(provider="cpu")).version == "5"


@pytest.mark.train
@pytest.mark.slow
def test_train_export_register_pull_end_to_end(tracking: str, tmp_path: Path) -> None:
    """mnist-train and mnist-export against the server: the export registers the ONNX files (alias
    champion); mnist-pull brings that alias into a fresh repository, byte-identical and loadable."""
    from export.export import main as export_main
    from training.train import main as train_main

    out = tmp_path / "out"
    assert train_main(["--data", str(FIXTURE), "--epochs", "1", "--hidden-units", "16", "--output", str(out),
                       "--experiment", "registry-e2e", "--progress", "0"]) == 0  # fmt: skip
    run_id = json.loads((out / "training.json").read_text())["run_id"]
    exported = tmp_path / "exported"
    assert export_main(["--run-id", run_id, "--data", str(FIXTURE), "--repository", str(exported),
                        "--alias", "champion"]) == 0  # fmt: skip
    version = _client().get_model_version_by_alias("mnist-mlp", "champion")
    assert version.run_id == run_id
    assert version.tags["repository_version"] == "1"

    repo = tmp_path / "models"
    assert pull_main(["mnist-mlp", "--alias", "champion", "--repository", str(repo)]) == 0
    for name in ("model.onnx",):
        assert (repo / "mnist-mlp" / "1" / name).read_bytes() == (exported / "mnist-mlp" / "1" / name).read_bytes()
    model = load_model(repo / "mnist-mlp" / "1", Settings(provider="cpu"))
    assert model.sha256 == version.tags["sha256"]
    shutil.rmtree(exported)
