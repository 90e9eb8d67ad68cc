"""Locust users for the MNIST service. Pick one class per run (``mnist-loadtest --profile``):

- ``JsonUser``: single-image JSON, back to back (no think time);
- ``PngUser``: single-image PNG, back to back;
- ``BulkUser``: the bulk endpoint, raw uint8 bodies with binary answers and JSON bodies;
- ``MixedUser``: what a real client population does, with think times of 0.5-3 s (``profiles.MIXED_THINK_S``;
  20 users offer about 11 req/s): mostly single JSON,
  some PNG, occasional bulk jobs, model metadata reads, and feedback with the true label of an earlier
  prediction.

Digits are real: the golden set from the model's ``metadata.json`` (``MNIST_LOADTEST_DIGITS`` may point at
a metadata.json or at an .npz holding ``x`` or ``x_test``), with the labels the model is known to give.
Every answer is checked: 200, a label in 0-9, 10 probabilities; a golden digit answered with another label
is a failure.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from locust import FastHttpUser, between, task
from PIL import Image

from loadtest.profiles import MIXED_THINK_S

ROOT = Path(__file__).resolve().parent.parent
BULK_SIZE = int(os.environ.get("MNIST_LOADTEST_BULK", "256"))


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # uint8 (n, 784)
    labels: np.ndarray | None  # labels the model is known to give (golden set), else None

    def pick(self) -> tuple[int, np.ndarray, int | None]:
        i = random.randrange(len(self.images))
        return i, self.images[i], (int(self.labels[i]) if self.labels is not None else None)


def _from_metadata(path: Path) -> Digits:
    golden = json.loads(path.read_text())["golden"]
    raw = base64.b64decode(golden["images_b64"])
    images = np.frombuffer(raw, dtype=np.uint8).reshape(int(golden["count"]), 784)
    return Digits(images, np.asarray(golden["labels"], dtype=np.int64))


def load_digits() -> Digits:
    configured = os.environ.get("MNIST_LOADTEST_DIGITS")
    if configured:
        path = Path(configured)
        if path.suffix == ".npz":
            with np.load(path) as data:
                key = "x" if "x" in data else "x_test"
                return Digits(np.asarray(data[key][:1024], dtype=np.uint8).reshape(-1, 784), None)
        return _from_metadata(path)
    for meta in sorted((ROOT / "models").glob("*/*/metadata.json")):
        return _from_metadata(meta)
    shared = ROOT.parent / "shared" / "data" / "mnist.npz"
    if shared.exists():
        with np.load(shared) as data:
            return Digits(np.asarray(data["x_test"][:1024], dtype=np.uint8).reshape(-1, 784), None)
    raise FileNotFoundError("no digits: set MNIST_LOADTEST_DIGITS to a model's metadata.json or an .npz")


DIGITS = load_digits()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.reshape(28, 28), mode="L").save(buf, format="PNG")
    return buf.getvalue()


JSON_BODIES = [json.dumps({"image": (img / 255.0).tolist()}).encode() for img in DIGITS.images]
PNG_BODIES = [_png(img) for img in DIGITS.images]
JSON_HEADERS = {"Content-Type": "application/json"}
PNG_HEADERS = {"Content-Type": "image/png"}
RAW_HEADERS = {"Content-Type": "application/octet-stream", "Accept": "application/octet-stream"}


def _bulk(n: int) -> tuple[np.ndarray, np.ndarray | None]:
    idx = np.random.randint(0, len(DIGITS.images), n)
    return DIGITS.images[idx], (DIGITS.labels[idx] if DIGITS.labels is not None else None)


class _Base(FastHttpUser):
    abstract = True
    last_prediction_id: str | None = None
    last_label: int | None = None

    def _post(self, path: str, body: bytes, headers: dict[str, str], name: str) -> Any:
        """POST raw bytes (locust's annotation says str, but geventhttpclient sends bytes as they are)."""
        return self.client.post(path, data=body, headers=headers, name=name, catch_response=True)  # type: ignore[arg-type]

    def _check_single(self, resp: object, expected: int | None) -> None:
        doc = resp.json()  # type: ignore[attr-defined]
        label, probs = doc.get("label"), doc.get("probabilities")
        if not isinstance(label, int) or not 0 <= label <= 9 or not isinstance(probs, list) or len(probs) != 10:
            resp.failure(f"malformed answer: {str(doc)[:200]}")  # type: ignore[attr-defined]
        elif expected is not None and label != expected:
            resp.failure(f"golden digit answered {label}, expected {expected}")  # type: ignore[attr-defined]
        else:
            self.last_prediction_id, self.last_label = doc.get("prediction_id"), expected

    def predict_json(self) -> None:
        i, _, expected = DIGITS.pick()
        with self._post("/v1/predict", JSON_BODIES[i], JSON_HEADERS, "/v1/predict json") as resp:
            if resp.status_code == 200:
                self._check_single(resp, expected)
            else:
                resp.failure(f"status {resp.status_code}: {resp.text[:200] if resp.text else ''}")

    def predict_png(self) -> None:
        i, _, expected = DIGITS.pick()
        with self._post("/v1/predict", PNG_BODIES[i], PNG_HEADERS, "/v1/predict png") as resp:
            if resp.status_code == 200:
                self._check_single(resp, expected)
            else:
                resp.failure(f"status {resp.status_code}")

    def predict_bulk_raw(self, n: int = BULK_SIZE) -> None:
        images, expected = _bulk(n)
        with self._post("/v1/predict/batch", images.tobytes(), RAW_HEADERS, f"/v1/predict/batch raw x{n}") as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            content = resp.content or b""
            if len(content) != n * 10 * 4:
                resp.failure(f"expected {n}x10 float32 ({n * 40} bytes), got {len(content)} bytes")
                return
            labels = np.frombuffer(content, dtype="<f4").reshape(n, 10).argmax(axis=1)
            if expected is not None and (wrong := int((labels != expected).sum())):
                resp.failure(f"{wrong} of {n} golden digits answered wrongly")

    def predict_bulk_json(self, n: int = 32) -> None:
        images, expected = _bulk(n)
        body = json.dumps({"images": (images / 255.0).tolist()}).encode()
        with self._post("/v1/predict/batch", body, JSON_HEADERS, f"/v1/predict/batch json x{n}") as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            labels = resp.json().get("labels")
            if not isinstance(labels, list) or len(labels) != n:
                resp.failure("malformed batch answer")
            elif expected is not None and labels != expected.tolist():
                resp.failure("golden digits answered wrongly")


class JsonUser(_Base):
    """Single-image JSON, closed loop."""

    @task
    def single_json(self) -> None:
        self.predict_json()


class PngUser(_Base):
    """Single-image PNG, closed loop."""

    @task
    def single_png(self) -> None:
        self.predict_png()


class BulkUser(_Base):
    """The bulk endpoint: raw bodies with binary answers (3 in 4), JSON (1 in 4)."""

    @task(3)
    def raw(self) -> None:
        self.predict_bulk_raw()

    @task(1)
    def json_batch(self) -> None:
        self.predict_bulk_json()


class MixedUser(_Base):
    """A realistic client: think time between actions, mostly single digits, some bulk, some feedback."""

    wait_time = between(*MIXED_THINK_S)

    @task(12)
    def single_json(self) -> None:
        self.predict_json()

    @task(5)
    def single_png(self) -> None:
        self.predict_png()

    @task(1)
    def bulk(self) -> None:
        self.predict_bulk_raw(64)

    @task(1)
    def models(self) -> None:
        self.client.get("/v1/models")

    @task(2)
    def feedback(self) -> None:
        if self.last_prediction_id is None or self.last_label is None:
            self.predict_json()
            return
        body = json.dumps({"prediction_id": self.last_prediction_id, "label": self.last_label}).encode()
        with self._post("/v1/feedback", body, JSON_HEADERS, "/v1/feedback") as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
        self.last_prediction_id = None
