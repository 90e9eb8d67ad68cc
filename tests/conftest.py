from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_model


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with one tiny (untrained) ONNX model, ``tiny/1``: no TensorFlow needed."""
    repo = tmp_path_factory.mktemp("models")
    write_model(repo, "tiny", "1", seed=0)
    return repo
