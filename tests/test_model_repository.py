"""The model repository: strict loading of a version (hostile metadata and files are refused with a clear
ModelLoadError), the promoted-version pointer, ``mnist-promote`` and which version the service serves."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from export.promote import PromoteError, promote, rollback
from export.promote import main as promote_main
from service.errors import ModelLoadError
from service.model import load_model
from service.registry import ModelRegistry
from service.repository import PROMOTED_FILE, promoted_version, read_promoted
from service.settings import Settings
from tests.helpers import DEFAULT_MODEL, running_server, write_model

CPU = Settings(provider="cpu")


def edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "metadata.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def refused(folder: Path, message: str, **kw: Any) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(folder, CPU, **kw)
    assert message in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- the good case


def test_the_shipped_model_loads_with_its_checks() -> None:
    model = load_model(DEFAULT_MODEL, CPU)
    assert (model.name, model.version) == ("mnist-mlp", "1")
    assert model.scale == pytest.approx(1 / 255)
    assert model.golden.images.shape == (32, 784)
    assert model.check_golden() == 32
    assert model.reference is not None
    assert len(model.reference.class_fractions) == model.n_classes == 10


def test_the_shipped_int8_variant_serves_when_asked_and_agrees_with_the_float_model() -> None:
    model = load_model(DEFAULT_MODEL, Settings(provider="cpu", model_precision="int8"))
    meta = json.loads((DEFAULT_MODEL / "metadata.json").read_text())
    assert model.path.name == meta["quantized"]["file"] == "model.int8.onnx"
    assert model.sha256 == meta["quantized"]["sha256"] != meta["sha256"]
    assert model.check_golden() == 32  # the golden labels are the float model's
    assert (model.describe()["precision"], model.describe()["file"]) == ("int8", "model.int8.onnx")
    float_model = load_model(DEFAULT_MODEL, CPU)
    assert (float_model.precision, float_model.path.name) == ("float32", "model.onnx")
    x = model.golden.images.astype("float32") * model.scale
    assert (model.run(x).argmax(axis=1) == float_model.run(x).argmax(axis=1)).all()


def _int8_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "mnist-mlp" / "1"
    shutil.copytree(DEFAULT_MODEL, folder)
    return folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m.pop("quantized"),
            "no int8 variant (metadata 'quantized'); export one with mnist-export --quantize",
        ),
        (lambda m: m["quantized"].update(sha256="0" * 64), "does not match metadata"),
        (lambda m: m["quantized"].update(sha256="x"), "(quantized): metadata sha256 must be the 64 hex digits"),
        (lambda m: m["quantized"].update(file="../../x.onnx"), "must be a file name inside the version folder"),
        (lambda m: m["quantized"].pop("file"), "must be a file name inside the version folder"),
    ],
)
def test_int8_is_refused_without_a_sound_quantized_variant(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    folder = _int8_copy(tmp_path)
    edit(folder, change)
    with pytest.raises(ModelLoadError) as info:
        load_model(folder, Settings(provider="cpu", model_precision="int8"))
    assert message in str(info.value)
    assert load_model(folder, CPU).precision == "float32"  # the float model is untouched by the int8 block


def test_the_shipped_repository_promotes_version_1() -> None:
    assert promoted_version(DEFAULT_MODEL.parent.parent, "mnist-mlp") == "1"


# ---------------------------------------------------------------------------------------------- hostile files


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ("/dev/zero", "must be a file name inside the version folder"),
        ("/etc/passwd", "must be a file name inside the version folder"),
        ("../2/model.onnx", "must be a file name inside the version folder"),
        ("sub/../../model.onnx", "must be a file name inside the version folder"),
        ("", "must be a file name inside the version folder"),
        (".", "must be a file name inside the version folder"),
        (7, "must be a file name inside the version folder"),
        (["model.onnx"], "must be a file name inside the version folder"),
        ("model\x00.onnx", "must be a file name inside the version folder"),
        ("missing.onnx", "cannot be read: No such file or directory"),
    ],
)
def test_the_model_file_must_be_inside_its_folder(tmp_path: Path, file: object, message: str) -> None:
    folder = write_model(tmp_path, "m", "1")
    write_model(tmp_path, "m", "2")
    edit(folder, lambda m: m.update(file=file))
    refused(folder, message)


def test_a_symlink_to_a_device_is_refused_before_reading(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", "1")
    (folder / "zero.onnx").symlink_to("/dev/zero")
    edit(folder, lambda m: m.update(file="zero.onnx"))
    refused(folder, "points outside its version folder")


def test_a_device_or_fifo_inside_the_folder_is_not_a_regular_file(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", "1")
    os.mkfifo(folder / "pipe.onnx")  # opening it for reading would block without O_NONBLOCK
    edit(folder, lambda m: m.update(file="pipe.onnx"))
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(refused(folder, "not a regular file")), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done, "loading a FIFO blocked"


def test_the_model_file_must_be_a_file(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", "1")
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").mkdir()
    refused(folder, "cannot be read: not a regular file")


def test_sizes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.model
    import service.repository

    folder = write_model(tmp_path, "m", "1")
    monkeypatch.setattr(service.model, "MAX_MODEL_BYTES", (folder / "model.onnx").stat().st_size - 1)
    refused(folder, "more than the limit of")
    monkeypatch.undo()
    edit(folder, lambda m: m.update(padding="x" * (service.repository.MAX_METADATA_BYTES + 1)))
    refused(folder, "more than the limit of 4194304")


def test_metadata_must_stay_in_its_folder(tmp_path: Path) -> None:
    outside = write_model(tmp_path / "elsewhere", "m", "1")
    folder = write_model(tmp_path / "repo", "m", "1")
    (folder / "metadata.json").unlink()
    (folder / "metadata.json").symlink_to(outside / "metadata.json")
    refused(folder, "points outside its version folder")


def test_a_version_folder_symlinked_outside_the_repository_is_refused(tmp_path: Path) -> None:
    outside = write_model(tmp_path / "elsewhere", "m", "2")
    repo = tmp_path / "repo"
    write_model(repo, "m", "1")
    (repo / "m" / "2").symlink_to(outside, target_is_directory=True)
    message = refused(repo / "m" / "2", "points outside the model repository")
    assert str(tmp_path / "elsewhere") not in message  # no resolved server path in the message
    model_dir = tmp_path / "models-link"
    model_dir.symlink_to(repo / "m", target_is_directory=True)  # a symlink inside the same tree is fine
    assert load_model(repo / "m" / "1", CPU).version == "1"


# ---------------------------------------------------------------------------------------------- hostile metadata


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        block = meta
        for key in parents:
            block = block[key]
        block[last] = value

    return change


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda meta: meta.pop(key)


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("no sha256", _drop("sha256"), "lacks required keys: ['sha256']"),
    ("null sha256", _set("sha256", None), "lacks required keys: ['sha256']"),
    ("short sha256", _set("sha256", "abc123"), "64 hex digits"),
    ("sha256 of something else", _set("sha256", "0" * 64), "does not match metadata"),
    ("no golden", _drop("golden"), "lacks required keys: ['golden']"),
    ("golden not an object", _set("golden", [1, 2]), "metadata 'golden' must be an object"),
    ("golden count a string", _set("golden.count", "16"), "malformed golden set"),
    ("golden count zero", _set("golden.count", 0), "malformed golden set"),
    ("golden count too big", _set("golden.count", 10**9), "malformed golden set"),
    ("golden labels short", _set("golden.labels", [1, 2]), "labels must be a list of 16"),
    ("golden label out of range", _set("golden.labels", [11] * 16), "integers in 0..9"),
    ("golden label a bool", _set("golden.labels", [True] * 16), "integers in 0..9"),
    ("golden not base64", _set("golden.images_b64", "***"), "images_b64"),
    ("golden wrong size", _set("golden.images_b64", "AAAA"), "expected count x 784"),
    ("reference a list", _set("reference", []), "metadata 'reference' must be an object"),
    ("reference empty", _set("reference", {}), "mean_intensity_edges must be a list of numbers"),
    ("edges not increasing", _set("reference.mean_intensity_edges", [0.0, 0.5, 0.2, 1.0]), "increasing"),
    ("edges strings", _set("reference.mean_intensity_edges", ["0", "1"]), "list of numbers"),
    ("fractions length", _set("reference.mean_intensity_fractions", [1.0]), "has 1 values, expected 20"),
    ("fractions NaN", _set("reference.mean_intensity_fractions", [float("nan")] * 20), "non-finite"),
    ("fractions negative", _set("reference.mean_intensity_fractions", [-0.05] * 20), "must not be negative"),
    ("class fractions length", _set("reference.class_fractions", [0.5, 0.5]), "has 2 values, expected 10"),
    ("input a string", _set("input", "pixels"), "metadata 'input' must be an object"),
    ("image shape 1-D", _set("input.image_shape", [784]), "image_shape must be [height, width]"),
    ("output a number", _set("output", 3), "metadata 'output' must be an object"),
    ("preprocessing a list", _set("preprocessing", [1]), "metadata 'preprocessing' must be an object"),
    ("scale missing", _set("preprocessing", {}), "preprocessing.scale must be a finite positive number"),
    ("scale zero", _set("preprocessing.scale", 0), "finite positive number"),
    ("scale negative", _set("preprocessing.scale", -1.0), "finite positive number"),
    ("scale a string", _set("preprocessing.scale", "0.0039"), "finite positive number"),
    ("scale infinite", _set("preprocessing.scale", float("inf")), "finite positive number"),
    ("scale huge int", _set("preprocessing.scale", 10**400), "finite positive number"),
    ("scale a bool", _set("preprocessing.scale", True), "finite positive number"),
    ("class labels a string", _set("class_labels", "0123456789"), "class_labels must be a non-empty list"),
    ("class labels objects", _set("class_labels", [{}] * 10), "class_labels must be a non-empty list"),
    ("name of another model", _set("name", "other"), "metadata names other/1, expected m/1"),
    ("version of another folder", _set("version", "2"), "metadata names m/2, expected m/1"),
    ("version a number", _set("version", 1), "version a positive integer"),
    ("no name", _drop("name"), "lacks required keys: ['name']"),
]


@pytest.mark.parametrize(("case", "change", "message"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_metadata_is_a_model_load_error(
    tmp_path: Path, case: str, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    folder = write_model(tmp_path, "m", "1")
    edit(folder, change)
    refused(folder, message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2, 3]", "it is not a JSON object"),
        ("{not json", "unreadable metadata"),
        ("[" * 100_000 + "]" * 100_000, "unreadable metadata"),
        (b"\xff\xfe{}".decode("latin-1"), "unreadable metadata"),
    ],
)
def test_unreadable_metadata(tmp_path: Path, text: str, message: str) -> None:
    folder = write_model(tmp_path, "m", "1")
    (folder / "metadata.json").write_text(text, encoding="latin-1")
    refused(folder, message)


def test_a_version_without_reference_statistics_loads_without_drift(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", "1")
    edit(folder, _drop("reference"))
    assert load_model(folder, CPU).reference is None


# ---------------------------------------------------------------------------------------------- promotion


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    for version in ("1", "2", "3"):
        write_model(repo, "m", version, seed=int(version))
    write_model(repo, "m", "4", seed=4, corrupt_golden=True)
    return repo


def test_promote_and_roll_back(repo: Path) -> None:
    assert promoted_version(repo, "m") is None
    assert promote(repo, "m", "2").previous is None
    assert promote(repo, "m", "3").previous == "2"
    assert promote(repo, "m", "3").previous == "3"  # already promoted: nothing written
    pointer = read_promoted(repo, "m")
    assert pointer is not None
    assert pointer["version"] == "3"
    assert [h["version"] for h in pointer["history"]] == ["2", "3"]
    assert [p.name for p in (repo / "m").iterdir() if p.name.startswith(".")] == []  # no temporary file left
    back = rollback(repo, "m")
    assert (back.version, back.previous) == ("2", "3")
    assert promoted_version(repo, "m") == "2"
    with pytest.raises(PromoteError, match="no earlier promoted version"):
        rollback(repo, "m")


@pytest.mark.parametrize(
    ("version", "message"),
    [("4", "16 of 16 golden inputs give the wrong label"), ("9", "has no version 9"), ("x", "has no version x")],
)
def test_promote_validates_like_the_service(repo: Path, version: str, message: str) -> None:
    promote(repo, "m", "1")
    with pytest.raises(PromoteError, match=message):
        promote(repo, "m", version)
    assert promoted_version(repo, "m") == "1"


def test_promote_cli(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--repository", str(repo), "--name", "m"]
    assert promote_main([*args, "2"]) == 0
    assert "promoted version 2 (was none)" in capsys.readouterr().out
    assert promote_main([*args, "4"]) == 1
    assert "golden inputs give the wrong label" in capsys.readouterr().err
    assert promote_main(args) == 0
    assert "promoted version 2" in capsys.readouterr().out
    assert promote_main([*args, "--rollback"]) == 1
    assert "no earlier promoted version" in capsys.readouterr().err
    (repo / "m" / PROMOTED_FILE).write_text('{"version": "../../etc"}')
    assert promote_main([*args, "3"]) == 1
    assert "must be a version number" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- what serves


def settings(repo: Path, version: str) -> Settings:
    return Settings(model_repository=repo, model_version=version, provider="cpu")


def test_the_service_serves_the_promoted_version(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    promote(repo, "m", "2")
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        assert ModelRegistry.load(settings(repo, "promoted")).default.version == "2"
    assert not caplog.records
    # "latest" is version 4, which is broken; a number works and warns that it is not the promoted one
    with pytest.raises(ModelLoadError, match="golden inputs give the wrong label"):
        ModelRegistry.load(settings(repo, "latest"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        assert ModelRegistry.load(settings(repo, "3")).default.version == "3"
    assert [r.getMessage() for r in caplog.records] == ["serving a version that is not the promoted one"]
    assert caplog.records[0].promoted == "2"  # type: ignore[attr-defined]


def test_without_a_pointer_the_highest_serves_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_model(tmp_path, "m", "1")
    write_model(tmp_path, "m", "2", seed=2)
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        assert ModelRegistry.load(settings(tmp_path, "promoted")).default.version == "2"
    assert "no promoted version" in caplog.text


@pytest.mark.parametrize(
    ("pointer", "message"),
    [
        ('{"version": "7"}', "the promoted version 7 of 'm' has no folder"),
        ('{"version": 2}', "'version' must be a version number"),
        ('{"version": "2", "history": "x"}', "'history' must be a list"),
        ("not json", "unreadable promoted-version pointer"),
        ("[]", "'version' must be a version number"),
    ],
)
def test_a_bad_pointer_stops_the_start(repo: Path, pointer: str, message: str) -> None:
    (repo / "m" / PROMOTED_FILE).write_text(pointer)
    with pytest.raises(ModelLoadError, match=message):
        ModelRegistry.load(settings(repo, "promoted"))


def test_a_real_server_serves_the_promoted_version_and_warns_otherwise(repo: Path, tmp_path: Path) -> None:
    shutil.rmtree(repo / "m" / "4")
    promote(repo, "m", "2")
    with running_server(repo, tmp_path) as srv, srv.client() as c:
        assert c.get("/readyz").json()["version"] == "2"
    assert "not the promoted one" not in srv.logs()
    with running_server(repo, tmp_path, "--model-version", "latest") as srv, srv.client() as c:
        assert c.get("/readyz").json()["version"] == "3"
    assert "serving a version that is not the promoted one" in srv.logs()
