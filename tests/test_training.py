"""training/: the data loader (cheap, no TensorFlow) and an end-to-end train -> export -> MLflow run."""

from __future__ import annotations

import json
import sys
import types
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from training.data import (
    HOW_TO_PROVIDE,
    DataError,
    load_mnist,
    load_npz,
    split_validation,
    to_features,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mnist_small.npz"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


def real_digits() -> tuple[Path, list[str]]:
    """Real MNIST: the full file with a 2,000-image training slice when present, else the shipped fixture."""
    if SHARED.is_file():
        return SHARED, ["--limit", "2000"]
    return FIXTURE, []


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _valid_arrays(n: int = 4) -> dict[str, np.ndarray]:
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    return {"x_train": images, "y_train": labels, "x_test": images, "y_test": labels}


# ---------------------------------------------------------------- data loader


def test_fixture_is_real_mnist_in_keras_layout() -> None:
    data = load_npz(FIXTURE)
    assert data.x_train.shape == (1000, 28, 28)
    assert data.x_test.shape == (1000, 28, 28)
    assert data.x_train.dtype == np.uint8
    assert set(np.unique(data.y_train)) == set(range(10))
    assert len(data.sha256) == 64
    assert FIXTURE.stat().st_size < 1_000_000


def test_npz_path_and_limit(tmp_path: Path) -> None:
    path = _save(tmp_path / "ok.npz", **_valid_arrays(6))
    data = load_mnist(path)
    assert data.source == str(path)
    limited = data.limit(4)
    assert len(limited.x_train) == 4
    assert len(limited.x_test) == 6
    assert data.limit(None) is data


def test_features_are_float32_in_unit_range() -> None:
    images = np.array([[[0] * 28] * 27 + [[255] * 28]], dtype=np.uint8)
    features = to_features(images)
    assert features.shape == (1, 784)
    assert features.dtype == np.float32
    assert features.min() == 0.0
    assert features.max() == 1.0


def test_validation_split_is_seeded() -> None:
    x = np.arange(100 * 784, dtype=np.uint8).reshape(100, 28, 28)
    y = (np.arange(100) % 10).astype(np.uint8)
    first = split_validation(x, y, 0.1, seed=3)
    again = split_validation(x, y, 0.1, seed=3)
    assert len(first[0]) == 90
    assert len(first[2]) == 10
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = _valid_arrays()
    text = tmp_path / "notes.npz"
    text.write_text("this is not an npz archive\n")
    single = tmp_path / "single.npy"
    np.save(single, good["x_train"])
    return {
        "missing file": tmp_path / "absent.npz",
        "not an npz": text,
        "a single .npy": single,
        "missing keys": _save(tmp_path / "keys.npz", x_train=good["x_train"], y_train=good["y_train"]),
        "float images": _save(tmp_path / "float.npz", **{**good, "x_train": good["x_train"].astype(np.float32)}),
        "flat images": _save(tmp_path / "flat.npz", **{**good, "x_test": good["x_test"].reshape(4, 784)}),
        "label count": _save(tmp_path / "count.npz", **{**good, "y_train": good["y_train"][:3]}),
        "label range": _save(tmp_path / "range.npz", **{**good, "y_test": good["y_test"] + 7}),
    }


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing file", "not found"),
        ("not an npz", "not a readable .npz"),
        ("a single .npy", "single array"),
        ("missing keys", "missing the array(s) x_test, y_test"),
        ("float images", "x_train must be uint8 with shape (N, 28, 28)"),
        ("flat images", "x_test must be uint8 with shape (N, 28, 28)"),
        ("label count", "y_train must be integer labels with shape (4,)"),
        ("label range", "labels must be in 0..9"),
    ],
)
def test_wrong_file_is_a_clear_error(tmp_path: Path, case: str, expected: str) -> None:
    with pytest.raises(DataError) as info:
        load_npz(_bad_files(tmp_path)[case])
    assert expected in str(info.value)


def _offline_keras() -> types.ModuleType:
    """A stand-in for ``keras`` whose MNIST loader fails the way Keras's does without network."""

    def load_data() -> None:
        raise Exception(  # Keras wraps URLError in a bare Exception
            "URL fetch failure on https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz: "
            "None -- [Errno -3] Temporary failure in name resolution"
        )

    fake = types.ModuleType("keras")
    fake.datasets = types.SimpleNamespace(mnist=types.SimpleNamespace(load_data=load_data))  # type: ignore[attr-defined]
    return fake


def test_no_data_and_no_network_is_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from training.train import main

    monkeypatch.setitem(sys.modules, "keras", _offline_keras())
    monkeypatch.chdir(tmp_path)
    assert main(["--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "Could not download MNIST" in err
    assert "--data path/to/mnist.npz" in err
    assert "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()  # failed before touching MLflow


def test_cli_reports_a_wrong_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.train import main

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"\x00" * 64)
    assert main(["--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a readable .npz" in err
    assert HOW_TO_PROVIDE in err


def test_cli_help_lists_the_hyper_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    from training.train import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--epochs", "--batch-size", "--learning-rate", "--dropout-rate", "--hidden-units", "--seed",
                 "--validation-split", "--data", "--limit", "--experiment", "--output", "--export"):  # fmt: skip
        assert flag in out


@pytest.mark.train
def test_real_keras_loader_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real ``keras.datasets.mnist.load_data`` with an empty cache and no network."""
    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras_config, "keras_home", lambda: str(tmp_path))
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    with pytest.raises(DataError) as info:
        load_mnist(None)
    assert "URL fetch failure" in str(info.value)
    assert "--data path/to/mnist.npz" in str(info.value)


# ---------------------------------------------------------------- end to end


@dataclass(frozen=True)
class Trained:
    root: Path
    data: Path
    run_id: str
    output: Path
    repository: Path
    train_argv: list[str]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """One epoch on a small slice of real digits, tracked in a throwaway SQLite store, then exported."""
    from export.export import main as export_main
    from training.train import main as train_main

    root = tmp_path_factory.mktemp("e2e")
    data, extra = real_digits()
    output = root / "out"
    argv = ["--data", str(data), *extra, "--epochs", "1", "--seed", "7", "--output", str(output),
            "--experiment", "e2e", "--progress", "0"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        assert train_main(argv) == 0
        info = json.loads((output / "training.json").read_text())
        repository = root / "models"
        export_argv = ["--run-id", info["run_id"], "--data", str(data), "--repository", str(repository),
                       "--quantize", "--alias", "champion"]  # fmt: skip
        assert export_main(export_argv) == 0
        yield Trained(root, data, info["run_id"], output, repository, argv)


@pytest.mark.train
@pytest.mark.slow
def test_run_is_tracked_in_mlflow(trained: Trained) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{trained.root / 'mlflow.db'}")
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    for key in ("epochs", "batch_size", "dropout_rate", "learning_rate", "hidden_units", "seed", "data_sha256"):
        assert key in params
    assert params["epochs"] == "1"
    assert params["seed"] == "7"
    assert params["hidden_units"] == "512"
    metrics = run.data.metrics
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "test_accuracy",
                "onnx_test_accuracy", "onnx_parity_max_abs_diff", "int8_test_accuracy"):  # fmt: skip
        assert key in metrics
    assert [m.step for m in client.get_metric_history(trained.run_id, "val_accuracy")] == [1]
    assert 0.6 < metrics["test_accuracy"] <= 1.0

    def listing(path: str | None = None) -> set[str]:
        return {a.path for a in client.list_artifacts(trained.run_id, path)}

    assert {"confusion_matrix.png", "confusion_matrix.json", "model", "onnx"} <= listing()
    assert {"model/model.keras", "model/training.json"} <= listing("model")
    assert {"onnx/1/model.onnx", "onnx/1/metadata.json", "onnx/1/model.int8.onnx"} <= listing("onnx/1")
    assert (trained.root / "mlruns" / "e2e").is_dir()  # artifacts stay beside the database

    # ...and registered: version 1 of the registered model "mnist-mlp", alias champion, source = those files
    registered = client.get_model_version_by_alias("mnist-mlp", "champion")
    assert registered.run_id == trained.run_id
    assert registered.source.endswith("/onnx/1")
    assert registered.tags["repository_version"] == "1"
    assert (
        registered.tags["sha256"]
        == json.loads((trained.repository / "mnist-mlp" / "1" / "metadata.json").read_text())["sha256"]
    )


@pytest.mark.train
@pytest.mark.slow
def test_export_writes_a_servable_version(trained: Trained) -> None:
    import base64
    import hashlib

    import onnxruntime as ort

    folder = trained.repository / "mnist-mlp" / "1"
    names = sorted(p.name for p in trained.repository.joinpath("mnist-mlp").iterdir())
    assert "1" in names
    assert all(n.isdigit() or n == "promoted.json" for n in names), names  # no staging folder left
    meta = json.loads((folder / "metadata.json").read_text())
    for key in ("name", "version", "file", "sha256", "input", "output", "preprocessing", "class_labels",
                "reference", "golden", "created_at", "opset", "test_accuracy", "mlflow_run_id", "training",
                "parity", "quantized"):  # fmt: skip
        assert key in meta
    assert (meta["name"], meta["version"], meta["file"]) == ("mnist-mlp", "1", "model.onnx")
    assert meta["sha256"] == hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    assert meta["input"] == {"name": "pixels", "shape": [None, 784], "dtype": "float32", "image_shape": [28, 28]}
    assert meta["output"] == {"name": "probabilities", "shape": [None, 10], "dtype": "float32"}
    assert meta["mlflow_run_id"] == trained.run_id
    assert meta["training"]["seed"] == 7
    assert meta["training"]["command"].startswith("mnist-train --data")
    assert meta["parity"]["labels_identical"] is True
    assert meta["parity"]["max_abs_diff"] <= 1e-5
    assert meta["parity"]["n"] == len(np.load(trained.data)["y_test"])

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    golden = meta["golden"]
    images = np.frombuffer(base64.b64decode(golden["images_b64"]), dtype=np.uint8).reshape(golden["count"], 784)
    for batch in (1, 7, golden["count"]):  # dynamic batch dimension
        probs = session.run(None, {"pixels": images[:batch].astype(np.float32) / 255})[0]
        assert probs.shape == (batch, 10)
        assert probs.argmax(axis=1).tolist() == golden["labels"][:batch]

    q = meta["quantized"]
    assert q["sha256"] == hashlib.sha256((folder / q["file"]).read_bytes()).hexdigest()
    assert q["size_bytes"] < (folder / "model.onnx").stat().st_size / 2
    assert abs(q["test_accuracy"] - meta["test_accuracy"]) < 0.02


@pytest.mark.train
@pytest.mark.slow
def test_export_from_the_model_file_auto_versions(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    from export.export import main as export_main

    common = ["--model", str(trained.output / "model.keras"), "--data", str(trained.data),
              "--repository", str(trained.repository), "--no-mlflow"]  # fmt: skip
    assert export_main(common) == 0
    meta = json.loads((trained.repository / "mnist-mlp" / "2" / "metadata.json").read_text())
    assert meta["version"] == "2"
    assert meta["mlflow_run_id"] == trained.run_id  # read from training.json beside the model
    assert "quantized" not in meta
    assert "not registered in MLflow" in capsys.readouterr().out  # --no-mlflow
    assert export_main([*common, "--version", "1"]) == 1
    assert "already exists" in capsys.readouterr().err


@pytest.mark.train
@pytest.mark.slow
def test_same_seed_same_weights(trained: Trained) -> None:
    import keras

    from training.train import main as train_main

    again = trained.root / "again"
    argv = [*trained.train_argv[: trained.train_argv.index("--output")], "--output", str(again),
            "--experiment", "e2e", "--progress", "0"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained.root / 'mlflow.db'}")
        assert train_main(argv) == 0
    first = keras.models.load_model(trained.output / "model.keras").get_weights()
    second = keras.models.load_model(again / "model.keras").get_weights()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- TensorFlow's own log lines


NATIVE_WRITER = """
import os, sys
from training.cli import native_logs
with native_logs(sys.argv[1] == "verbose", "probe") as native:
    os.write(2, b"E0000 00:00:1 native line from C++\\n")
    print("python message", file=sys.stderr)
    native.failed = sys.argv[2] == "fail"
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_native_stderr_is_kept_out_of_the_terminal_unless_verbose(mode: str) -> None:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", NATIVE_WRITER, mode, "ok"], capture_output=True, text=True,
                          cwd=root, timeout=60, check=True)  # fmt: skip
    assert "python message" in proc.stderr
    assert ("native line from C++" in proc.stderr) == (mode == "verbose")


def test_a_failed_command_keeps_the_native_log_and_says_where() -> None:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", NATIVE_WRITER, "quiet", "fail"], capture_output=True, text=True,
                          cwd=root, timeout=60, check=True)  # fmt: skip
    assert "native line from C++" not in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "TensorFlow's own log is in" in x)
    path = Path(line.split(" is in ", 1)[1].split(" ", 1)[0])
    assert "native line from C++" in path.read_text()
    path.unlink()


@pytest.mark.train
def test_tensorflow_import_prints_no_native_log_lines() -> None:
    """Importing TensorFlow and running an op logs absl lines (CUDA probing, oneDNN) on stderr; not here."""
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    code = ("import sys\nfrom training.cli import native_logs\nwith native_logs(False, 'probe'):\n"
            "    import tensorflow as tf\n    tf.constant([1.0]) + 1\n    print('done', file=sys.stderr)\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300,
                          check=True)  # fmt: skip
    assert "done" in proc.stderr
    assert not re.search(r"^[IWEF]\d{4} ", proc.stderr, re.MULTILINE), proc.stderr
    assert "absl::InitializeLog" not in proc.stderr
