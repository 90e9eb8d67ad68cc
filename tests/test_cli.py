"""Every stage has a console entry point whose --help works; serving never imports TensorFlow or MLflow."""

from __future__ import annotations

import os
import socket
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
        "import sys, service.server, service.app, service.rest, service.oip, service.admin, service.demo,"
        " service.docs_assets, service.png;"
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


def test_cors_origins_accept_a_comma_separated_list_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import settings_from_args

    cases = {
        "https://a.example": ["https://a.example"],
        "https://a.example, https://b.example,": ["https://a.example", "https://b.example"],
        '["https://a.example", "https://b.example"]': ["https://a.example", "https://b.example"],
        "": [],
    }
    for value, expected in cases.items():
        monkeypatch.setenv("MNIST_CORS_ORIGINS", value)
        assert settings_from_args([]).cors_origins == expected, value
    assert settings_from_args(["--cors-origins", "http://a,http://b", "http://c"]).cors_origins == [
        "http://a", "http://b", "http://c"
    ]  # fmt: skip


def test_log_level_is_one_of_the_allowed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import InvalidSettings, settings_from_args

    monkeypatch.setenv("MNIST_LOG_LEVEL", "WARNING")
    assert settings_from_args([]).log_level == "warning"
    assert settings_from_args(["--log-level", "DEBUG"]).log_level == "debug"
    monkeypatch.setenv("MNIST_LOG_LEVEL", "verbose")
    with pytest.raises(InvalidSettings) as caught:
        settings_from_args([])
    assert caught.value.problems == [
        "MNIST_LOG_LEVEL='verbose': input should be 'critical', 'error', 'warning', 'info' or 'debug' "
        "(setting log_level)"
    ]


def test_help_lists_allowed_values_and_no_none_default() -> None:
    from service.settings import build_parser

    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert "--graph-optimization {disable,basic,extended,all}" in text
    assert "--log-level {critical,error,warning,info,debug}" in text
    assert "--provider {auto,cpu,cuda}" in text
    assert "--event-loop {uvloop,asyncio}" in text
    assert "(default: None)" not in text
    assert "Model to serve (default: the only one in the repository, else the first by name)." in text
    assert "comma-separated or a JSON list" in text


def serve(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The real ``mnist-serve`` entry point, with the environment cleaned of MNIST_* variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    return subprocess.run(
        [str(BIN / "mnist-serve"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**base, **(env or {})},
    )


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert lines, proc.stdout
    assert all(line.startswith("mnist-serve: error: ") for line in lines), proc.stderr
    return [line.removeprefix("mnist-serve: error: ") for line in lines]


def test_every_settings_error_is_one_line_naming_its_source(tiny_repo: Path) -> None:
    env = {
        "MNIST_CORS_ORIGINS": "[https://a.example",  # neither a JSON list nor an origin list
        "MNIST_PORT": "eighty",
        "MNIST_PROVIDER": "tpu",
    }
    proc = serve("--model-repository", str(tiny_repo), "--max-batch-size", "0", env=env)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 4, lines
    by_source = {line.split(":", 1)[0].split("=", 1)[0].split(" ", 1)[0]: line for line in lines}
    assert set(by_source) == {"MNIST_CORS_ORIGINS", "MNIST_PORT", "MNIST_PROVIDER", "--max-batch-size"}
    assert "not a JSON list" in by_source["MNIST_CORS_ORIGINS"]
    assert "valid integer" in by_source["MNIST_PORT"]
    assert "'auto', 'cpu' or 'cuda'" in by_source["MNIST_PROVIDER"]
    assert "greater than or equal to 1" in by_source["--max-batch-size"]
    assert all("(setting " in line for line in lines)


def test_a_comma_separated_cors_env_starts_the_server(tiny_repo: Path, tmp_path: Path) -> None:
    from tests.helpers import running_server

    env = {"MNIST_CORS_ORIGINS": "https://a.example,https://b.example"}
    with running_server(tiny_repo, tmp_path, env=env) as server, server.client() as client:
        for origin in ("https://a.example", "https://b.example"):
            r = client.get("/healthz", headers={"Origin": origin})
            assert r.headers.get("access-control-allow-origin") == origin
        assert (
            "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "https://c.example"}).headers
        )


def test_a_bad_flag_is_one_line() -> None:
    proc = serve("--log-level", "loud")
    assert proc.returncode == 2
    assert error_lines(proc) == [
        "argument --log-level: invalid choice: 'loud' (choose from 'critical', 'error', 'warning', 'info', 'debug') "
        "(see mnist-serve --help)"
    ]


def test_a_port_in_use_is_named(tiny_repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve("--model-repository", str(tiny_repo), "--port", str(port))
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert line.startswith(f"port {port} is in use;"), line
    assert "--port" in line


def test_outside_the_repo_the_missing_model_repository_says_how_to_fix_it(tmp_path: Path) -> None:
    proc = serve(cwd=tmp_path)
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert line.startswith(f"model repository models does not exist (looked in {tmp_path / 'models'})"), line
    assert "--model-repository" in line
    assert "MNIST_MODEL_REPOSITORY" in line
