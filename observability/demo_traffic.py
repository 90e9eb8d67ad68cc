"""Demo traffic for scripts/monitoring-stack: single JSON predictions with labelled feedback, a few .npy batches
and a few malformed requests, from real MNIST digits (the repository's small fixture).

    .venv/bin/python observability/demo_traffic.py --url http://127.0.0.1:8000 [--drift] [--requests N]

Standard library and numpy only (both in the service's own dependencies), so it runs in a venv made with the
``cpu`` extra alone. ``--drift`` sends inverted digits (255 - x): the drift score jumps. Set
``MNIST_FEEDBACK_TOKEN`` when the service requires a feedback token. It runs until interrupted (or for
``--requests`` predictions) and exits 1 when the service stops answering.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mnist_small.npz"


class Client:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.statuses: dict[int, int] = {}

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, Any]:
        """(status, parsed JSON body or None); 4xx/5xx are answers, not errors. Raises URLError when unreachable."""
        headers = {"Content-Type": content_type}
        if self.token and path == "/v1/feedback":
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, raw = int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        self.statuses[status] = self.statuses.get(status, 0) + 1
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None


def run(url: str, drift: bool, requests: int | None, pause_s: float) -> int:
    with np.load(FIXTURE) as data:
        x, y = np.asarray(data["x_test"], dtype=np.uint8), np.asarray(data["y_test"])
    if drift:
        x = 255 - x
    rng = np.random.default_rng()
    client = Client(url, os.environ.get("MNIST_FEEDBACK_TOKEN") or None)
    failures_in_a_row = 0
    sent = 0
    while requests is None or sent < requests:
        try:
            i = int(rng.integers(len(x)))
            body = json.dumps({"image": (x[i] / 255).round(3).ravel().tolist()}).encode()
            status, doc = client.post("/v1/predict", body, "application/json")
            sent += 1
            if status == 200 and rng.random() < 0.3:
                feedback = {"prediction_id": doc["prediction_id"], "label": int(y[i])}
                client.post("/v1/feedback", json.dumps(feedback).encode(), "application/json")
            if rng.random() < 0.05:
                buf = io.BytesIO()
                np.save(buf, x[rng.integers(len(x), size=64)])
                client.post("/v1/predict/batch", buf.getvalue(), "application/x-npy")
            if rng.random() < 0.02:
                client.post("/v1/predict", b"{not json", "application/json")
            failures_in_a_row = 0
        except (urllib.error.URLError, OSError) as exc:
            failures_in_a_row += 1
            if failures_in_a_row >= 20:
                print(f"demo traffic: {url} stopped answering ({exc}); statuses so far {client.statuses}",
                      file=sys.stderr, flush=True)  # fmt: skip
                return 1
            time.sleep(0.5)
            continue
        if sent % 500 == 0:
            print(f"demo traffic: {sent} predictions, statuses {client.statuses}", flush=True)
        time.sleep(pause_s)
    print(f"demo traffic: {sent} predictions, statuses {client.statuses}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default http://127.0.0.1:8000)")
    p.add_argument("--drift", action="store_true", help="send inverted digits")
    p.add_argument("--requests", type=int, default=None, help="stop after this many predictions (default: never)")
    p.add_argument("--pause-s", type=float, default=0.05, help="pause between predictions (default 0.05 s)")
    args = p.parse_args(argv)
    try:
        return run(args.url, args.drift, args.requests, args.pause_s)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
