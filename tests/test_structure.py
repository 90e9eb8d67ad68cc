"""The shape of the code: no import cycles in service/, training/ and export/, small service modules, and a
serving path that never imports TensorFlow or MLflow."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("service", "training", "export")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at any depth (function-level and TYPE_CHECKING imports included)."""
    found: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "proto" not in p.parts]
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_and_function_level_imports_are_seen(tmp_path: Path) -> None:
    src = "def f():\n    from service import errors\n    import service.model\n"
    path = ROOT / "service" / "_probe_for_test.py"
    try:
        path.write_text(src)
        assert imports_of(path, {"service", "service.errors", "service.model"}) >= {"service.errors", "service.model"}
    finally:
        path.unlink()


def test_no_import_cycles_in_service_training_export() -> None:
    graph = import_graph()
    assert {"service.app", "service.inference", "training.train", "export.export"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


@pytest.mark.parametrize("path", sorted((ROOT / "service").glob("*.py")), ids=lambda p: p.name)
def test_service_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 300, f"{path.name} has {lines} lines; split it by responsibility"


def test_the_inference_core_imports_nothing_from_http() -> None:
    graph = import_graph()
    banned = {"service.asgi", "service.rest", "service.oip", "service.app", "service.admin", "service.demo"}
    text = (ROOT / "service" / "inference.py").read_text()
    assert not graph["service.inference"] & banned
    assert "starlette" not in text
    assert "fastapi" not in text


def test_serving_never_imports_tensorflow_or_mlflow() -> None:
    code = (
        "import sys, service.server, service.app, service.grpc_server\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'mlflow', 'keras', 'tf2onnx'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pillow_is_loaded_by_the_first_png_not_at_start() -> None:
    """Pillow is 2-3 MB of resident memory that a service never sent a PNG does not need."""
    code = (
        "import sys, service.server, service.app, service.decode as d\n"
        "print('PIL' in sys.modules)\n"
        "from tests.test_png import png\n"
        "import numpy as np\n"
        "d.png_one(png(np.zeros((28, 28), np.uint8)), 'image/png', d.Shape(784, 28, 28, 1, 784))\n"
        "print('PIL' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "True"], result.stdout + result.stderr


def test_the_readme_names_only_real_settings() -> None:
    from service.settings import Settings

    named = set(re.findall(r"\bMNIST_([A-Z0-9_]+)", (ROOT / "README.md").read_text()))
    real = {name.upper() for name in Settings.model_fields}
    assert named, "no setting found in the README"
    assert named <= real, f"the README names settings that do not exist: {sorted(named - real)}"
