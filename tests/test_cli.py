"""Every stage has a console entry point whose --help works; serving never imports TensorFlow or MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("mnist-train", "--epochs"),
        ("mnist-export", "--quantize"),
        ("mnist-serve", "--max-batch-size"),
        ("mnist-loadtest", "--host"),
        ("mnist-bench", "--concurrency"),
    ],
)
def test_entry_point_help(command: str, expected: str) -> None:
    proc = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout


def test_serve_help_lists_every_setting_with_its_default() -> None:
    from service.settings import Settings, build_parser

    text = build_parser().format_help()
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text
    assert "(default: 256)" in text


def test_serving_imports_no_training_library() -> None:
    code = (
        "import sys, service.server, service.app, service.routes, service.oip, service.admin, service.demo;"
        "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'mlflow') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_settings_come_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import settings_from_args

    monkeypatch.setenv("MNIST_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("MNIST_PORT", "9000")
    s = settings_from_args(["--port", "9100", "--no-access-log", "--cors-origins", "http://a", "http://b"])
    assert (s.max_batch_size, s.port, s.access_log) == (64, 9100, False)
    assert s.cors_origins == ["http://a", "http://b"]
