"""Model versions and hot swap on a real server: the admin endpoint loads, checks, warms and swaps a version
while clients keep sending; a broken version is refused and the old one keeps serving."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import Server, assert_clean_shutdown, run_onnx, running_server, start_server, tiny_onnx, write_model

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_other_contract(repo: Path, version: str) -> None:
    """A valid, self-consistent model whose input is 10x10 pixels: loads fine, but changes the contract."""
    blob = tiny_onnx(5, features=100)
    folder = write_model(repo, "tiny", version, blob=blob)
    meta = json.loads((folder / "metadata.json").read_text())
    golden = np.random.default_rng(1).integers(0, 256, (4, 100), dtype=np.uint8)
    meta["input"]["image_shape"] = [10, 10]
    meta["input"]["shape"] = [None, 100]
    meta["golden"] = {"images_b64": base64.b64encode(golden.tobytes()).decode(), "count": 4,
                      "labels": run_onnx(blob, golden / 255).argmax(axis=1).tolist()}  # fmt: skip
    (folder / "metadata.json").write_text(json.dumps(meta))


def write_hostile(repo: Path, outside: Path) -> None:
    """Versions 6..12: metadata or files that try to read outside the version folder, or lack what is required."""

    def edit(version: str, **changes: object) -> Path:
        folder = write_model(repo, "tiny", version, seed=int(version))
        meta = json.loads((folder / "metadata.json").read_text())
        meta.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del meta[key]
        (folder / "metadata.json").write_text(json.dumps(meta))
        return folder

    edit("6", file="/dev/zero")
    edit("7", file="../1/model.onnx")
    (repo / "tiny" / "8").symlink_to(write_model(outside, "tiny", "8", seed=8), target_is_directory=True)
    edit("9", sha256=None)
    edit("10", golden=None)
    folder = edit("11")
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to("/dev/zero")
    edit("12", reference={"mean_intensity_edges": "0..1", "mean_intensity_fractions": [], "class_fractions": []})


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("swap-models")
    write_model(repo, "tiny", "1", seed=1)
    write_model(repo, "tiny", "2", seed=2)
    write_model(repo, "tiny", "3", seed=3, corrupt_golden=True)  # golden labels do not match
    write_model(repo, "tiny", "4", blob=b"this is not an ONNX model")
    write_other_contract(repo, "5")
    write_hostile(repo, tmp_path_factory.mktemp("outside-the-repository"))
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(repo, tmp_path_factory.mktemp("swap-srv"),
                       env={"MNIST_ADMIN_TOKEN": TOKEN, "MNIST_MODEL_VERSION": "1"})  # fmt: skip
    yield srv
    assert_clean_shutdown(srv)


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def load(client: httpx.Client, version: str, **params: str) -> httpx.Response:
    return client.post(f"/admin/models/tiny/versions/{version}/load", headers=AUTH, params=params)


def predict_version(client: httpx.Client) -> str:
    resp = client.post("/v1/predict", json={"image": [0.2] * 784})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-model-version"] == resp.json()["version"]
    return str(resp.json()["version"])


def model_info(client: httpx.Client) -> dict[str, float]:
    """version -> value of mnist_model_info (1 = default, 0 = loaded)."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("mnist_model_info{"):
            version = line.split('version="', 1)[1].split('"', 1)[0]
            out[version] = float(line.rsplit(" ", 1)[1])
    return out


def images_processed(client: httpx.Client, version: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("mnist_images_processed_total{") and f'version="{version}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---------------------------------------------------------------------------------------------- auth
def test_admin_needs_the_token(client: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):  # fmt: skip
        resp = client.post("/admin/models/tiny/versions/2/load", headers=headers)
        assert resp.status_code == 401, resp.text
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert resp.json()["error"]["code"] == "unauthorized"
        assert client.get("/admin/models", headers=headers).status_code == 401
    assert predict_version(client) == "1"  # nothing was loaded
    listing = client.get("/admin/models", headers=AUTH).json()
    assert listing["default_version"] == "1"
    assert listing["available_versions"] == [str(v) for v in range(1, 13)]


def test_admin_is_off_without_a_token_and_broken_versions_are_skipped(repo: Path, tmp_path: Path) -> None:
    with running_server(repo, tmp_path, "--model-version", "2", "--load-all-versions") as srv, srv.client() as c:
        resp = c.post("/admin/models/tiny/versions/2/load", headers=AUTH)
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "not_found"
        assert c.get("/admin/models", headers=AUTH).status_code == 404
        assert c.get("/readyz").json()["version"] == "2"
        assert c.get("/v2/models/tiny").json()["versions"] == ["1", "2"]  # 3 to 12 are refused
    assert srv.logs().count("skipping a broken version") == 10


# ---------------------------------------------------------------------------------------------- swap under load
@dataclass(frozen=True)
class Call:
    start: float
    end: float
    status: int
    version: str | None
    error: str | None = None


class Load:
    """Client threads posting to /v1/predict until stopped; ``wait_for`` is gated on a Condition."""

    def __init__(self, url: str, threads: int) -> None:
        self.url = url
        self.calls: list[Call] = []
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def _loop(self, seed: int) -> None:
        image = np.random.default_rng(seed).random(784).round(3).tolist()
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    resp = c.post("/v1/predict", json={"image": image})
                    body = resp.json()
                    version = body.get("version")
                    err = None if resp.headers.get("x-model-version") == version else "header/body mismatch"
                    call = Call(t0, time.monotonic(), resp.status_code, version, err)
                except Exception as exc:  # recorded, and the test fails on it
                    call = Call(t0, time.monotonic(), 0, None, repr(exc))
                with self.cond:
                    self.calls.append(call)
                    self.cond.notify_all()

    def wait_for(self, count: int, started_after: float, timeout: float = 60) -> None:
        """Until ``count`` calls that started after ``started_after`` have finished."""
        with self.cond:
            ok = self.cond.wait_for(lambda: sum(c.start > started_after for c in self.calls) >= count, timeout)
        assert ok, f"the load threads stalled ({len(self.calls)} calls)"

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


@pytest.mark.slow
def test_swap_under_load_loses_nothing(server: Server, client: httpx.Client) -> None:
    assert load(client, "1").status_code == 200
    before = {v: images_processed(client, v) for v in ("1", "2")}
    plan = ["2", "1", "2"]
    swaps: list[tuple[float, float, str]] = []
    with Load(server.url, threads=4) as traffic:
        traffic.wait_for(100, 0.0)
        for version in plan:
            t0 = time.monotonic()
            resp = load(client, version)
            t1 = time.monotonic()
            assert resp.status_code == 200, resp.text
            assert resp.json()["default_version"] == version
            swaps.append((t0, t1, version))
            traffic.wait_for(150, t1)  # requests sent after the swap answered
    calls = traffic.calls
    failed = [c for c in calls if c.status != 200 or c.error]
    assert not failed, f"{len(failed)} of {len(calls)} requests failed, e.g. {failed[:3]}"
    # Every request sent after a swap returned (and before the next began) was answered by the new version.
    for (_, done, version), nxt in zip(swaps, [*swaps[1:], (float("inf"), 0.0, "")], strict=True):
        window = [c.version for c in calls if done < c.start and c.end < nxt[0]]
        assert window, "no request fell between two swaps"
        assert set(window) == {version}, (version, sorted(set(window)))
    assert {c.version for c in calls} == {"1", "2"}
    assert model_info(client) == {"1": 0.0, "2": 1.0}
    assert images_processed(client, "1") > before["1"]
    assert images_processed(client, "2") > before["2"]
    assert predict_version(client) == "2"


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("version", "status", "reason"),
    [
        ("3", 422, "16 of 16 golden inputs give the wrong label"),
        ("4", 422, "is not a loadable ONNX model"),
        ("5", 422, "changes the contract"),
        ("6", 422, "metadata 'file' must be a file name inside the version folder, got '/dev/zero'"),
        ("7", 422, "metadata 'file' must be a file name inside the version folder, got '../1/model.onnx'"),
        ("8", 422, "tiny/8 points outside the model repository"),
        ("9", 422, "lacks required keys: ['sha256']"),
        ("10", 422, "lacks required keys: ['golden']"),
        ("11", 422, "points outside its version folder"),
        ("12", 422, "reference.mean_intensity_edges must be a list of numbers"),
        ("99", 404, "no folder for version 99"),
        ("01", 404, "not a version number"),
        ("x", 404, "not a version number"),
    ],
)
def test_a_broken_version_is_refused_and_the_old_keeps_serving(
    client: httpx.Client, version: str, status: int, reason: str
) -> None:
    assert load(client, "1").status_code == 200
    info = model_info(client)
    resp = load(client, version)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert reason in err["message"]
    if status == 422:
        assert err["code"] == "model_refused"
        assert "still serving version 1" in err["message"]
        assert str(Path.cwd()) not in err["message"]  # no server paths
    assert predict_version(client) == "1"
    assert model_info(client) == info
    assert client.get("/readyz").json()["version"] == "1"


def test_wrong_model_name_is_not_found(client: httpx.Client) -> None:
    resp = client.post("/admin/models/other/versions/2/load", headers=AUTH)
    assert resp.status_code == 404
    assert "not served here" in resp.json()["error"]["message"]


def test_load_beside_then_unload(client: httpx.Client) -> None:
    assert load(client, "1").status_code == 200
    resp = load(client, "2", default="false")
    assert resp.status_code == 200, resp.text
    assert resp.json()["default_version"] == "1"
    assert predict_version(client) == "1"
    doc = {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [0.1] * 784}]}
    assert client.post("/v2/models/tiny/versions/2/infer", json=doc).json()["model_version"] == "2"
    assert model_info(client) == {"1": 1.0, "2": 0.0}

    default = client.post("/admin/models/tiny/versions/1/unload", headers=AUTH)
    assert default.status_code == 409
    assert default.json()["error"]["code"] == "version_in_use"
    gone = client.post("/admin/models/tiny/versions/2/unload", headers=AUTH)
    assert gone.status_code == 200, gone.text
    assert [m["version"] for m in gone.json()["loaded"]] == ["1"]
    assert client.post("/v2/models/tiny/versions/2/infer", json=doc).status_code == 404
    assert model_info(client) == {"1": 1.0}
    assert client.post("/admin/models/tiny/versions/2/unload", headers=AUTH).status_code == 404
