"""``mnist-export``: Keras model (file or MLflow run) -> ``models/<name>/<version>/`` for the service.

Steps: convert with tf2onnx, check parity with Keras on the whole test set (fail loudly), compute test accuracy,
drift reference statistics and golden digits, optionally quantize to int8, write ``model.onnx`` +
``metadata.json`` (+ ``model.int8.onnx``) into a staging folder, check it loads exactly as the service loads a
version, rename it into place, log the files to the training run in MLflow and register them as a version of
the registered model (optionally with aliases such as ``champion``). The promoted version (the one the
service serves by default) does not move unless ``--promote`` is given.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from training.cli import HelpFormatter, native_logs
from training.data import DataError, MnistData, file_sha256, load_mnist, to_features

DEFAULT_NAME = "mnist-mlp"


@dataclass(frozen=True)
class ExportConfig:
    model: Path | None = None
    run_id: str | None = None
    data: Path | None = None
    repository: Path = Path("models")
    name: str = DEFAULT_NAME
    version: int | None = None
    opset: int = 17
    quantize: bool = False
    tolerance: float = 1e-5
    overwrite: bool = False
    log_to_mlflow: bool = True
    register: bool = True
    registered_model: str | None = None
    aliases: tuple[str, ...] = ()
    promote: bool = False
    verbose: bool = False
    command: str = "mnist-export"


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    metadata: dict[str, Any]
    registered: Any = None  # export.mlflow_models.RegisteredVersion when registered in MLflow
    promoted: bool = False
    repository: Path = Path("models")


def build_parser() -> argparse.ArgumentParser:
    d = ExportConfig()
    p = argparse.ArgumentParser(
        prog="mnist-export",
        description="Export a trained Keras MNIST model to ONNX with metadata for the serving repository.",
        formatter_class=HelpFormatter,
    )
    src = p.add_argument_group("model source (one or both)")
    src.add_argument(
        "--model",
        type=Path,
        default=None,
        help="Keras model file written by mnist-train (e.g. artifacts/mnist-mlp/model.keras)",
    )
    src.add_argument(
        "--run-id",
        default=None,
        help="MLflow run id: loads its model artifact (when --model is absent) and logs the export to it",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="mnist.npz (Keras layout) for parity, accuracy and reference statistics; without it Keras downloads MNIST",
    )
    out = p.add_argument_group("output")
    out.add_argument("--repository", type=Path, default=d.repository, help="model repository root")
    out.add_argument("--name", default=d.name, help="model name (a folder under the repository)")
    out.add_argument(
        "--version", type=int, default=None, help="version number (a positive integer); default: highest existing + 1"
    )
    out.add_argument("--overwrite", action="store_true", help="replace the version if it already exists")
    conv = p.add_argument_group("conversion")
    conv.add_argument("--opset", type=int, default=d.opset, help="ONNX opset")
    conv.add_argument(
        "--tolerance",
        type=float,
        default=d.tolerance,
        help="maximum |Keras - ONNX| probability difference allowed on the test set",
    )
    conv.add_argument(
        "--quantize",
        action="store_true",
        help="also write model.int8.onnx (onnxruntime dynamic quantization, int8 weights)",
    )
    out.add_argument(
        "--promote",
        action="store_true",
        help="also make it the promoted version, the one the service serves by default (else: mnist-promote)",
    )
    reg = p.add_argument_group("MLflow")
    reg.add_argument(
        "--no-mlflow",
        dest="log_to_mlflow",
        action="store_false",
        help="do not log the ONNX files and metrics to the MLflow run, nor register them",
    )
    reg.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="log the files to the run but do not register them as a model version",
    )
    reg.add_argument(
        "--registered-model", default=None, help="name of the registered model in MLflow (default: --name)"
    )
    reg.add_argument(
        "--alias",
        dest="aliases",
        action="append",
        default=None,
        help="set this alias (e.g. champion) on the new registered version; repeatable",
    )
    p.add_argument("--verbose", action="store_true", help="show TensorFlow's own log lines")
    return p


def parse_config(argv: Sequence[str]) -> ExportConfig:
    ns = vars(build_parser().parse_args(list(argv)))
    ns["aliases"] = tuple(ns["aliases"] or ())
    return ExportConfig(**ns, command=shlex.join(["mnist-export", *argv]))


def _versions() -> dict[str, str]:
    import keras
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _quantized_block(
    float_path: Path, folder: Path, features: np.ndarray, y_test: np.ndarray, float_labels: np.ndarray
) -> dict[str, Any]:
    import onnxruntime

    from export.accuracy import cpu_description
    from export.parity import onnx_predict
    from export.quantize import QUANTIZED_FILE, WEIGHT_TYPE, quantize

    path = folder / QUANTIZED_FILE
    quantize(float_path, path)
    labels = onnx_predict(path, features).argmax(axis=1)
    return {
        "file": QUANTIZED_FILE,
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
        "test_accuracy": float(np.mean(labels == y_test)),
        "weight_type": WEIGHT_TYPE,
        "label_agreement_with_float": float(np.mean(labels == float_labels)),
        # int8 kernels differ by instruction set: the figures above hold for this CPU (docs/training.md).
        "measured_on": {**cpu_description(), "onnxruntime": onnxruntime.__version__},
    }


def _log_to_run(run_id: str, folder: Path, meta: dict[str, Any]) -> None:
    from export.mlflow_models import artifact_path
    from training.tracking import client

    mlflow_client = client()
    for path in sorted(folder.iterdir()):
        mlflow_client.log_artifact(run_id, str(path), artifact_path=artifact_path(meta["version"]))
    metrics = {
        "onnx_test_accuracy": meta["test_accuracy"],
        "onnx_parity_max_abs_diff": meta["parity"]["max_abs_diff"],
    }
    if "quantized" in meta:
        metrics["int8_test_accuracy"] = meta["quantized"]["test_accuracy"]
        metrics["int8_size_bytes"] = float(meta["quantized"]["size_bytes"])
    for key, value in metrics.items():
        mlflow_client.log_metric(run_id, key, float(value))
    mlflow_client.set_tag(run_id, "exported_model", f"{meta['name']}/{meta['version']}")


def run_export(config: ExportConfig, data: MnistData | None = None) -> ExportResult:
    """Export as configured; :class:`ExportError` (or :class:`DataError`) with a clear message on failure."""
    import onnx

    from export import metadata, reference
    from export.convert import describe_io, keras_to_onnx
    from export.parity import compare, onnx_predict, require
    from export.promote import promote
    from export.repository import check_target, next_version, staged_version
    from export.source import resolve

    version = config.version if config.version is not None else next_version(config.repository, config.name)
    check_target(config.repository, config.name, version, config.overwrite)  # fail before the slow part
    data = data if data is not None else load_mnist(config.data)
    with tempfile.TemporaryDirectory(prefix="mnist-export-") as work:
        source = resolve(config.model, config.run_id, Path(work))
        import keras  # TensorFlow loads only once there is a model to convert

        try:
            model = keras.models.load_model(source.model_path)
        except Exception as exc:  # Keras raises ValueError/OSError/TypeError for bad files
            raise ExportError(f"cannot load the Keras model {source.model_path}: {exc}") from exc
        if data.sha256 != source.info.get("data_sha256", data.sha256):
            print(
                "mnist-export: warning: the data differs from the training data (data_sha256); the "
                "accuracy and reference statistics describe the data given here",
                file=sys.stderr,
            )
        proto = keras_to_onnx(model, config.opset)
        features = to_features(data.x_test)
        keras_probs = np.asarray(model.predict(features, batch_size=2048, verbose=0), dtype=np.float32)

        with staged_version(config.repository, config.name, version, config.overwrite) as folder:
            onnx_path = folder / metadata.MODEL_FILE
            onnx.save_model(proto, onnx_path)
            onnx_probs = onnx_predict(onnx_path, features)
            parity = compare(keras_probs, onnx_probs, config.tolerance)
            require(parity)
            labels = onnx_probs.argmax(axis=1)
            quantized = _quantized_block(onnx_path, folder, features, data.y_test, labels) if config.quantize else None
            (in_name, in_shape), (out_name, out_shape) = describe_io(proto)
            count = min(reference.GOLDEN_COUNT, len(data.x_test))
            meta = metadata.build(
                name=config.name,
                version=version,
                sha256=file_sha256(onnx_path),
                opset=config.opset,
                inp=metadata.OnnxIO(in_name, in_shape),
                out=metadata.OnnxIO(out_name, out_shape),
                test_accuracy=float(np.mean(labels == data.y_test)),
                mlflow_run_id=source.run_id,
                training=metadata.training_block(source.info, _versions(), config.command),
                parity=parity.as_metadata(),
                reference=reference.reference_stats(data.x_train, labels),
                golden=reference.golden_set(data.x_test[:count], labels[:count]),
                quantized=quantized,
            )
            metadata.write(meta, folder)
            _check_servable(folder, config, version)
    final = config.repository / config.name / str(version)
    registered = None
    if source.run_id is not None and source.run_reachable and config.log_to_mlflow:
        from mlflow.exceptions import MlflowException

        from export.mlflow_models import register

        try:
            _log_to_run(source.run_id, final, meta)
            if config.register:
                registered = register(source.run_id, meta, config.registered_model or config.name, config.aliases)
        except (ExportError, MlflowException, OSError) as exc:
            raise ExportError(f"{final} was written (not promoted), but MLflow failed: {exc}") from exc
    if config.promote:
        promote(config.repository, config.name, str(version), command=config.command)
    return ExportResult(final, meta, registered, config.promote, config.repository)


def _check_servable(folder: Path, config: ExportConfig, version: int) -> None:
    """Load the staged version exactly as the service will; a failure leaves nothing behind."""
    from service.errors import ModelLoadError
    from service.model import load_model
    from service.settings import Settings

    try:
        load_model(folder, Settings.model_validate({"provider": "cpu"}), repository=config.repository,
                   expected=(config.name, str(version)))  # fmt: skip
    except ModelLoadError as exc:
        raise ExportError(f"the exported version does not load as the service loads it: {exc}") from exc


def summary(result: ExportResult) -> str:
    meta = result.metadata
    parity = meta["parity"]
    lines = [
        f"exported {result.folder}/{meta['file']} (sha256 {meta['sha256'][:12]}..., opset {meta['opset']})",
        f"test_accuracy={meta['test_accuracy']:.4f} on {parity['n']} test digits",
        f"parity: max_abs_diff={parity['max_abs_diff']:.3g} labels_identical={parity['labels_identical']}",
    ]
    if "quantized" in meta:
        q = meta["quantized"]
        lines.append(f"int8: {q['file']} test_accuracy={q['test_accuracy']:.4f} size={q['size_bytes']} bytes")
    if meta["mlflow_run_id"]:
        lines.append(f"run_id={meta['mlflow_run_id']}")
    reg = result.registered
    if reg is not None:
        aliases = f" (aliases: {', '.join(reg.aliases)})" if reg.aliases else ""
        lines.append(f"registered in MLflow as {reg.name} version {reg.version}{aliases}")
    else:
        lines.append("not registered in MLflow (no reachable training run, or --no-mlflow / --no-register)")
    from export.promote import next_steps

    lines.append(next_steps(result.repository, meta["name"], meta["version"], promoted=result.promoted))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    with native_logs(config.verbose, "mnist-export") as native:
        try:
            result = run_export(config)
        except (ExportError, DataError) as exc:
            print(f"mnist-export: error: {exc}", file=sys.stderr)
            native.failed = True
            return 1
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
