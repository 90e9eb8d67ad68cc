"""export/: the pieces without TensorFlow (reference statistics, repository, parity, metadata), then the
conversion and the CLI's failure modes on a tiny Keras model."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from export import metadata, reference
from export.errors import ExportError
from export.parity import ParityError, compare, require
from export.repository import existing_versions, next_version, staged_version

FIXTURE = Path(__file__).parent / "fixtures" / "mnist_small.npz"
SERVICE_KEYS = ("name", "version", "file", "sha256", "input", "output", "preprocessing", "class_labels",
                "reference", "golden")  # fmt: skip


# ---------------------------------------------------------------- reference statistics and golden digits


def test_mean_intensity_edges_cover_zero_to_one() -> None:
    edges = reference.MEAN_INTENSITY_EDGES
    assert edges[0] == 0.0
    assert edges[-1] == 1.0
    assert len(edges) == 21
    assert list(edges) == sorted(set(edges))


def test_reference_fractions_of_real_digits() -> None:
    with np.load(FIXTURE) as npz:
        x_train, y_test = npz["x_train"], npz["y_test"]
    stats = reference.reference_stats(x_train, y_test)
    fractions = stats["mean_intensity_fractions"]
    assert len(fractions) == len(stats["mean_intensity_edges"]) - 1
    assert sum(fractions) == pytest.approx(1.0)
    assert max(fractions[0], fractions[-1]) < 0.01  # real digits sit inside the fine bins
    assert sum(stats["class_fractions"]) == pytest.approx(1.0)
    assert len(stats["class_fractions"]) == 10


def test_extreme_images_land_in_the_end_bins() -> None:
    images = np.stack([np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8)])
    fractions = reference.mean_intensity_fractions(images)
    assert fractions[0] == 0.5
    assert fractions[-1] == 0.5


def test_golden_set_round_trips() -> None:
    images = np.arange(2 * 784, dtype=np.uint64).astype(np.uint8).reshape(2, 28, 28)
    golden = reference.golden_set(images, np.array([3, 9]))
    decoded = np.frombuffer(base64.b64decode(str(golden["images_b64"])), dtype=np.uint8).reshape(2, 28, 28)
    np.testing.assert_array_equal(decoded, images)
    assert golden["count"] == 2
    assert golden["labels"] == [3, 9]


# ---------------------------------------------------------------- repository


def test_next_version_is_highest_plus_one(tmp_path: Path) -> None:
    assert next_version(tmp_path, "m") == 1
    for name in ("1", "3", "latest", ".staging-4-abc"):
        (tmp_path / "m" / name).mkdir(parents=True)
    assert existing_versions(tmp_path, "m") == [1, 3]
    assert next_version(tmp_path, "m") == 4


def test_staged_version_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    with staged_version(tmp_path, "m", 1) as folder:
        (folder / "model.onnx").write_bytes(b"x")
        assert not (tmp_path / "m" / "1").exists()
    assert (tmp_path / "m" / "1" / "model.onnx").read_bytes() == b"x"

    def failing_export() -> None:
        with staged_version(tmp_path, "m", 2) as folder:
            (folder / "model.onnx").write_bytes(b"y")
            raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        failing_export()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]

    with pytest.raises(ExportError, match="already exists"), staged_version(tmp_path, "m", 1):
        pass
    with staged_version(tmp_path, "m", 1, overwrite=True) as folder:
        (folder / "model.onnx").write_bytes(b"z")
    assert (tmp_path / "m" / "1" / "model.onnx").read_bytes() == b"z"


# ---------------------------------------------------------------- parity and metadata


def test_parity_passes_within_tolerance_and_fails_loudly() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    ok = compare(probs, probs + np.float32(1e-7))
    require(ok)
    assert ok.labels_identical
    assert ok.n == 2
    flipped = compare(probs, probs[:, ::-1].copy())
    assert not flipped.labels_identical
    with pytest.raises(ParityError, match="does not match Keras"):
        require(flipped)
    with pytest.raises(ParityError, match="tolerance"):
        require(compare(probs, probs + np.float32(1e-3)))


def test_what_the_export_writes_is_what_the_service_loads(tmp_path: Path) -> None:
    """metadata.build + write with real reference statistics and golden digits (as run_export computes them),
    beside a real ONNX file: the service's loader accepts the folder and reads back what was written."""
    from service.model import load_model
    from service.settings import Settings
    from tests.helpers import run_onnx, tiny_onnx
    from training.data import file_sha256, load_npz, to_features

    data = load_npz(FIXTURE)
    blob = tiny_onnx(3)
    labels = run_onnx(blob, to_features(data.x_test)).argmax(axis=1)
    folder = tmp_path / "mnist-mlp" / "3"
    folder.mkdir(parents=True)
    (folder / metadata.MODEL_FILE).write_bytes(blob)
    meta = metadata.build(
        name="mnist-mlp", version=3, sha256=file_sha256(folder / metadata.MODEL_FILE), opset=17,
        inp=metadata.OnnxIO("pixels", [None, 784]), out=metadata.OnnxIO("probabilities", [None, 10]),
        test_accuracy=float(np.mean(labels == data.y_test)), mlflow_run_id=None, training={},
        parity={"max_abs_diff": 0.0, "labels_identical": True, "n": 1000, "tolerance": 1e-5},
        reference=reference.reference_stats(data.x_train, labels),
        golden=reference.golden_set(data.x_test[: reference.GOLDEN_COUNT], labels[: reference.GOLDEN_COUNT]),
        quantized=None,
    )  # fmt: skip
    written = json.loads(metadata.write(meta, folder).read_text())
    assert written == meta
    assert all(key in written for key in SERVICE_KEYS)
    assert written["version"] == "3"
    assert written["created_at"].endswith("Z")
    assert "quantized" not in written

    model = load_model(folder, Settings(provider="cpu"))
    assert (model.name, model.version, model.sha256) == ("mnist-mlp", "3", written["sha256"])
    assert model.scale == written["preprocessing"]["scale"] == 1 / 255
    assert model.class_labels == written["class_labels"] == [str(i) for i in range(10)]
    assert model.check_golden() == reference.GOLDEN_COUNT == written["golden"]["count"]
    np.testing.assert_array_equal(model.golden.images, data.x_test[:32].reshape(32, 784))
    np.testing.assert_array_equal(model.golden.labels, labels[:32])
    assert model.reference is not None
    assert model.reference.mean_intensity_edges.tolist() == list(reference.MEAN_INTENSITY_EDGES)
    assert model.reference.mean_intensity_fractions.sum() == pytest.approx(1.0)
    assert model.reference.class_fractions.tolist() == written["reference"]["class_fractions"]


def test_the_cpu_of_a_measurement_is_described() -> None:
    from export.accuracy import cpu_description

    cpu = cpu_description()
    assert cpu["isa"] in ("avx512_vnni", "avx512bw", "avx_vnni", "avx2", "sse4_1", cpu["machine"])
    assert cpu["model"]
    assert all(isinstance(f, str) for f in cpu["features"])


# ---------------------------------------------------------------- conversion and CLI (TensorFlow)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model of the same shape (16 hidden units), fitted briefly on the fixture, without MLflow."""
    from training.data import load_npz, to_features
    from training.model import ModelConfig, build_model, seed_everything

    data = load_npz(FIXTURE)
    seed_everything(0)
    model = build_model(ModelConfig(hidden_units=16), total_steps=8)
    model.fit(to_features(data.x_train), data.y_train, epochs=1, batch_size=128, verbose=0)
    path = tmp_path_factory.mktemp("tiny") / "model.keras"
    model.save(path)
    return path


@pytest.mark.train
def test_conversion_names_io_and_keeps_the_batch_dynamic(tiny_model: Path) -> None:
    import keras
    import onnxruntime as ort

    from export.convert import describe_io, keras_to_onnx

    model = keras.models.load_model(tiny_model)
    proto = keras_to_onnx(model, opset=17)
    assert describe_io(proto) == (("pixels", [None, 784]), ("probabilities", [None, 10]))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((5, 784), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"pixels": x})[0], model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.train
def test_export_a_model_file_without_mlflow(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.accuracy import cpu_description
    from export.export import main
    from service.model import load_model
    from service.repository import promoted_version
    from service.settings import Settings

    common = ["--model", str(tiny_model), "--data", str(FIXTURE), "--repository", str(tmp_path), "--name", "tiny"]
    assert main([*common, "--quantize", "--opset", "15"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "tiny" / "1"
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["mlflow_run_id"] is None
    assert meta["opset"] == 15
    assert meta["parity"]["n"] == 1000
    assert meta["training"]["tf2onnx"]
    assert meta["training"]["command"] is None  # no training.json beside this model
    q = meta["quantized"]
    assert q["file"] == "model.int8.onnx"
    assert (folder / "model.int8.onnx").is_file()
    assert q["measured_on"]["isa"] == cpu_description()["isa"]
    assert q["measured_on"]["onnxruntime"] == meta["training"]["onnxruntime"]
    # Exactly what the service loads, and the export says what to do next without moving the promoted version.
    model = load_model(folder, Settings(provider="cpu"))
    assert model.sha256 == meta["sha256"]
    assert "not registered in MLflow" in out
    assert f"mnist-promote --repository {tmp_path} --name tiny 1" in out
    assert "/admin/models/tiny/versions/1/load" in out
    assert promoted_version(tmp_path, "tiny") is None

    assert main([*common, "--promote"]) == 0
    assert promoted_version(tmp_path, "tiny") == "2"
    assert "version 2 is now the promoted version" in capsys.readouterr().out


@pytest.mark.train
def test_parity_failure_exits_non_zero_and_writes_nothing(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import export.parity
    from export.export import main

    real = export.parity.onnx_predict

    def drifting(path: Path, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        return real(path, features, batch_size) + np.float32(1e-3)

    monkeypatch.setattr(export.parity, "onnx_predict", drifting)
    assert main(["--model", str(tiny_model), "--data", str(FIXTURE), "--repository", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "ONNX output does not match Keras" in err
    assert "Traceback" not in err
    assert list((tmp_path / "mnist-mlp").iterdir()) == []


def test_cli_without_a_model_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from export.export import main

    assert main(["--data", str(FIXTURE), "--repository", str(tmp_path)]) == 1
    assert "--model path/to/model.keras or --run-id" in capsys.readouterr().err


def test_cli_with_a_missing_model_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from export.export import main

    assert main(["--model", str(tmp_path / "nope.keras"), "--data", str(FIXTURE), "--repository", str(tmp_path)]) == 1
    assert "model file not found" in capsys.readouterr().err
