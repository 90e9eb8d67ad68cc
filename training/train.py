"""``mnist-train``: train the MNIST MLP, track the run in MLflow, save the Keras model (optionally export it).

The defaults are the recipe of the committed model ``models/mnist-mlp/1`` (98.3 % test accuracy):
a 784-512-10 MLP with batch size 128, 20 epochs with a cosine-decayed Adam learning rate.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from training.cli import HelpFormatter, native_logs
from training.data import DataError, MnistData, load_mnist, split_validation, to_features
from training.tracking import DEFAULT_EXPERIMENT, MODEL_ARTIFACT_DIR, MODEL_FILE, TRAINING_INFO_FILE

DEFAULT_OUTPUT = Path("artifacts/mnist-mlp")


@dataclass(frozen=True)
class TrainConfig:
    data: Path | None = None
    limit: int | None = None
    epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    dropout_rate: float = 0.2
    hidden_units: int = 512
    seed: int = 42
    validation_split: float = 0.1
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    output: Path = DEFAULT_OUTPUT
    progress: int = 2
    verbose: bool = False
    export: bool = False
    model_repository: Path = Path("models")
    model_name: str = "mnist-mlp"
    quantize: bool = False
    command: str = "mnist-train"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_path: Path
    info_path: Path
    test_accuracy: float


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="mnist-train",
        description="Train the MNIST MLP (784-512-10), track it in MLflow and save the Keras model.",
        formatter_class=HelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        type=Path,
        default=None,
        help="mnist.npz in Keras's layout; without it Keras downloads MNIST (needs network)",
    )
    data.add_argument(
        "--limit", type=_positive_int, default=None, help="use only the first N training images (quick runs and tests)"
    )
    data.add_argument(
        "--validation-split",
        type=_fraction,
        default=d.validation_split,
        help="fraction of the training images held out (seeded) for validation metrics",
    )
    hp = p.add_argument_group("hyper-parameters")
    hp.add_argument("--epochs", type=_positive_int, default=d.epochs, help="training epochs")
    hp.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="mini-batch size")
    hp.add_argument("--learning-rate", type=float, default=d.learning_rate, help="Adam (initial) learning rate")
    hp.add_argument(
        "--lr-schedule",
        choices=["cosine", "constant"],
        default=d.lr_schedule,
        help="cosine: decay the learning rate to 1%% of its start over all steps",
    )
    hp.add_argument("--dropout-rate", type=_fraction, default=d.dropout_rate, help="dropout after the hidden layer")
    hp.add_argument("--hidden-units", type=_positive_int, default=d.hidden_units, help="width of the hidden layer")
    hp.add_argument("--seed", type=int, default=d.seed, help="seed for weights, shuffling and the validation split")
    out = p.add_argument_group("tracking and output")
    out.add_argument("--experiment", default=d.experiment, help="MLflow experiment name")
    out.add_argument("--run-name", default=None, help="MLflow run name (MLflow generates one when absent)")
    out.add_argument(
        "--output", type=Path, default=d.output, help=f"directory for {MODEL_FILE} and {TRAINING_INFO_FILE}"
    )
    out.add_argument(
        "--progress",
        type=int,
        choices=[0, 1, 2],
        default=d.progress,
        help="Keras progress: 0 silent, 1 progress bar, 2 one line per epoch",
    )
    out.add_argument("--verbose", action="store_true", help="show TensorFlow's own log lines")
    exp = p.add_argument_group("export (optional, same as running mnist-export afterwards)")
    exp.add_argument("--export", action="store_true", help="export the trained model to ONNX when done")
    exp.add_argument(
        "--model-repository", type=Path, default=d.model_repository, help="model repository root for --export"
    )
    exp.add_argument("--model-name", default=d.model_name, help="model name for --export")
    exp.add_argument("--quantize", action="store_true", help="with --export: also write model.int8.onnx")
    return p


def parse_config(argv: Sequence[str]) -> TrainConfig:
    ns = build_parser().parse_args(list(argv))
    command = shlex.join(["mnist-train", *argv])
    return TrainConfig(**vars(ns), command=command)


def _params(config: TrainConfig, data: MnistData, n_fit: int, n_val: int) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    return {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "lr_schedule": config.lr_schedule,
        "dropout_rate": config.dropout_rate,
        "hidden_units": config.hidden_units,
        "seed": config.seed,
        "validation_split": config.validation_split,
        "limit": config.limit,
        "data_source": data.source,
        "data_sha256": data.sha256,
        "n_train": n_fit,
        "n_validation": n_val,
        "n_test": len(data.x_test),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "command": config.command,
    }


def _evaluate(model: Any, data: MnistData) -> tuple[float, float, np.ndarray]:
    """(test accuracy, test cross-entropy, predicted labels) on the whole test set."""
    from training.evaluate import accuracy

    probabilities = model.predict(to_features(data.x_test), batch_size=1024, verbose=0)
    predicted = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(data.y_test)), data.y_test.astype(np.int64)]
    test_loss = float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))
    return accuracy(data.y_test, predicted), test_loss, predicted


def train(config: TrainConfig, data: MnistData) -> TrainResult:
    """Fit, evaluate and save the model inside one MLflow run (marked FAILED if anything raises)."""
    from mlflow.entities import Metric, Param

    from training import tracking
    from training.callbacks import MlflowEpochLogger
    from training.evaluate import confusion_figure, confusion_matrix
    from training.model import LrSchedule, ModelConfig, build_model, seed_everything

    client, experiment_id = tracking.configure(config.experiment)
    seed_everything(config.seed)
    subset = data.limit(config.limit)
    x_fit, y_fit, x_val, y_val = split_validation(subset.x_train, subset.y_train, config.validation_split, config.seed)
    steps_per_epoch = -(-len(x_fit) // config.batch_size)
    model_config = ModelConfig(
        hidden_units=config.hidden_units,
        dropout_rate=config.dropout_rate,
        learning_rate=config.learning_rate,
        lr_schedule=cast(LrSchedule, config.lr_schedule),
    )
    model = build_model(model_config, total_steps=config.epochs * steps_per_epoch)
    params = _params(config, subset, len(x_fit), len(x_val))

    run = client.create_run(experiment_id, run_name=config.run_name, tags=tracking.run_tags("mnist-train"))
    run_id = run.info.run_id
    status = "FAILED"
    try:
        print(f"MLflow run {run_id} (tracking: {tracking.tracking_uri()})", flush=True)
        client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
        model.fit(
            to_features(x_fit),
            y_fit,
            epochs=config.epochs,
            batch_size=config.batch_size,
            validation_data=(to_features(x_val), y_val) if len(x_val) else None,
            shuffle=True,
            verbose=config.progress,
            callbacks=[MlflowEpochLogger(client, run_id)],
        )

        test_accuracy, test_loss, predicted = _evaluate(model, data)
        now = int(time.time() * 1000)
        client.log_batch(
            run_id, metrics=[Metric("test_accuracy", test_accuracy, now, 0), Metric("test_loss", test_loss, now, 0)]
        )
        matrix = confusion_matrix(data.y_test, predicted)
        figure = confusion_figure(matrix, f"MNIST test set, accuracy {test_accuracy:.4f}")
        client.log_figure(run_id, figure, "confusion_matrix.png")
        client.log_dict(run_id, {"rows_true_cols_predicted": matrix.tolist()}, "confusion_matrix.json")

        config.output.mkdir(parents=True, exist_ok=True)
        model_path = config.output / MODEL_FILE
        info_path = config.output / TRAINING_INFO_FILE
        model.save(model_path)
        info = {"run_id": run_id, "test_accuracy": test_accuracy, "test_loss": test_loss, **params}
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        client.log_artifact(run_id, str(model_path), artifact_path=MODEL_ARTIFACT_DIR)
        client.log_artifact(run_id, str(info_path), artifact_path=MODEL_ARTIFACT_DIR)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status)
    return TrainResult(run_id=run_id, model_path=model_path, info_path=info_path, test_accuracy=test_accuracy)


def _export(config: TrainConfig, result: TrainResult, data: MnistData) -> int:
    from export.errors import ExportError
    from export.export import ExportConfig, run_export, summary

    export_config = ExportConfig(
        model=result.model_path,
        run_id=result.run_id,
        data=config.data,
        repository=config.model_repository,
        name=config.model_name,
        quantize=config.quantize,
        verbose=config.verbose,
        command=config.command,
    )
    try:
        exported = run_export(export_config, data=data)
    except ExportError as exc:
        print(f"mnist-train: export failed: {exc}", file=sys.stderr)
        return 1
    print(summary(exported))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    with native_logs(config.verbose, "mnist-train") as native:
        code = _main(config)
        native.failed = code != 0
    return code


def _main(config: TrainConfig) -> int:
    try:
        data = load_mnist(config.data)
        result = train(config, data)
    except DataError as exc:
        print(f"mnist-train: error: {exc}", file=sys.stderr)
        return 2
    print(f"test_accuracy={result.test_accuracy:.4f}")
    print(f"saved {result.model_path} and {result.info_path}")
    print(f"run_id={result.run_id}")
    if config.export:
        return _export(config, result, data)
    data_arg = f" --data {config.data}" if config.data is not None else ""
    print(f"next: mnist-export --run-id {result.run_id}{data_arg} --quantize  (writes the next version and "
          "registers it in MLflow; --alias champion tags it there)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
