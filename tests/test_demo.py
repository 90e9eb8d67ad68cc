"""The browser demo in a real headless Chromium (Debian's, driven by Playwright): draw digits with the
mouse and with touch, read the answer on the page, check what the page sent to /v1/predict."""

from __future__ import annotations

import itertools
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import DEFAULT_MODEL, ROOT, Server, assert_clean_shutdown, start_server

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
DASHBOARD = "http://127.0.0.1:3999/d/mnist-serving"
#: With the trained default model the answers must be right; with the tiny untrained one they are arbitrary.
REAL = (DEFAULT_MODEL / "model.onnx").exists()
#: Set to 1 to refresh the screenshot in docs/ (done once, with the real model).
UPDATE_DOCS = os.environ.get("MNIST_UPDATE_DEMO_SCREENSHOT") == "1"

Point = tuple[float, float]
SEVEN = [[(80, 60), (205, 60), (120, 235)]]
ONE = [[(142, 40), (138, 240)]]
ZERO = [[(140 + 55 * math.sin(t), 140 - 90 * math.cos(t)) for t in np.linspace(0, 2 * math.pi, 48)]]


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo, args = (DEFAULT_MODEL.parent.parent, ["--model-name", DEFAULT_MODEL.parent.name]) if REAL else (tiny_repo, [])
    srv = start_server(repo, tmp_path_factory.mktemp("demo-srv"), *args, env={"MNIST_DASHBOARD_URL": DASHBOARD})
    yield srv
    assert_clean_shutdown(srv)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 900, "height": 620}, has_touch=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.goto(server.url + "/")
    pg.wait_for_selector("body[data-ready='1']")
    yield pg
    context.close()
    assert not errors, errors


def pad_origin(page: Any) -> Point:
    box = page.locator("#pad").bounding_box()
    assert box["width"] == 280
    return box["x"], box["y"]


def mouse_strokes(page: Any, strokes: list[list[Point]]) -> dict[str, Any]:
    """Draw with the mouse; returns the JSON the page posted after the last stroke, and the answer."""
    ox, oy = pad_origin(page)
    for i, stroke in enumerate(strokes):
        page.mouse.move(ox + stroke[0][0], oy + stroke[0][1])
        page.mouse.down()
        for (xa, ya), (x, y) in itertools.pairwise(stroke):
            page.mouse.move(ox + x, oy + y, steps=max(1, round(math.dist((xa, ya), (x, y)) / 12)))
        if i < len(strokes) - 1:
            page.mouse.up()
    with page.expect_response("**/v1/predict") as info:
        page.mouse.up()
    return answer_of(page, info.value, len(strokes))


def touch_stroke(page: Any, stroke: list[Point]) -> dict[str, Any]:
    """Draw one stroke with a finger (CDP touch events: Chromium turns them into touch pointer events)."""
    ox, oy = pad_origin(page)
    cdp = page.context.new_cdp_session(page)

    def touch(kind: str, points: list[Point]) -> None:
        cdp.send("Input.dispatchTouchEvent",
                 {"type": kind, "touchPoints": [{"x": ox + x, "y": oy + y} for x, y in points]})  # fmt: skip

    touch("touchStart", [stroke[0]])
    (x0, y0), (x1, y1) = stroke[0], stroke[-1]
    for t in np.linspace(0, 1, 24)[1:]:
        touch("touchMove", [(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)])
    with page.expect_response("**/v1/predict") as info:
        touch("touchEnd", [])
    return answer_of(page, info.value, 1)


def answer_of(page: Any, response: Any, strokes: int) -> dict[str, Any]:
    page.wait_for_selector(f"#result[data-seq='{strokes}']")
    assert response.status == 200
    return {"sent": response.request.post_data_json["image"], "answer": response.json()}


def shown(page: Any) -> dict[str, Any]:
    """What the page shows, read from the DOM in one go."""
    view: dict[str, Any] = page.evaluate(
        """() => ({
            label: document.getElementById("label").textContent,
            bars: document.querySelectorAll("#bars li .bar").length,
            pct: [...document.querySelectorAll("#bars .pct")].map((e) => e.textContent),
            top: [...document.querySelectorAll("#bars li.top")].map((e) => e.dataset.digit),
            meta: document.getElementById("meta").textContent,
        })"""
    )
    view["pct"] = [None if t == "-" else float(t.rstrip("%")) for t in view["pct"]]
    return view


def check_mnist_like(pixels: list[float]) -> np.ndarray:
    """What the page sent: 784 values in [0, 1]; the ink fits 20x20 (its longer side is 20) and its
    centre of mass is the image centre (to within the rounding of a one-pixel shift)."""
    img = np.asarray(pixels, dtype=np.float64)
    assert img.shape == (784,)
    assert img.min() >= 0.0
    assert img.max() == 1.0
    img = img.reshape(28, 28)
    rows, cols = np.nonzero(img)
    assert max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == 20
    ys, xs = np.mgrid[0:28, 0:28] + 0.5
    mass = img.sum()
    assert abs((img * xs).sum() / mass - 14) <= 0.5 + 1e-6
    assert abs((img * ys).sum() / mass - 14) <= 0.5 + 1e-6
    return img


def check_page_matches(page: Any, got: dict[str, Any]) -> dict[str, Any]:
    view = shown(page)
    answer = got["answer"]
    assert view["bars"] == 10
    assert view["label"] == str(answer["label"])
    assert view["top"] == [str(answer["label"])]
    assert view["pct"] == pytest.approx([round(p * 100, 1) for p in answer["probabilities"]], abs=0.051)
    assert f"v{answer['version']}" in view["meta"]
    return view


def test_draw_a_one_with_the_mouse(page: Any, tmp_path: Path) -> None:
    got = mouse_strokes(page, ONE)
    img = check_mnist_like(got["sent"])
    assert np.count_nonzero(img.sum(axis=1)) == 20  # a vertical stroke: 20 rows tall, narrow
    assert np.count_nonzero(img.sum(axis=0)) <= 5
    view = check_page_matches(page, got)
    page.screenshot(path=str(tmp_path / "demo-one.png"))
    if REAL:
        assert view["label"] == "1", view


def test_draw_a_seven_and_a_zero_then_clear(page: Any, tmp_path: Path) -> None:
    got = mouse_strokes(page, SEVEN)
    check_mnist_like(got["sent"])
    seven = check_page_matches(page, got)
    page.screenshot(path=str(tmp_path / "demo-seven.png"))
    if REAL:
        assert seven["label"] == "7", seven
        if UPDATE_DOCS:
            page.screenshot(path=str(ROOT / "docs" / "demo.png"))

    page.click("#clear")
    page.wait_for_selector("#result[data-seq='0']")
    cleared = shown(page)
    assert cleared["label"] == "?"
    assert cleared["top"] == []
    assert cleared["pct"] == [None] * 10

    got = mouse_strokes(page, [ZERO[0], ZERO[0][:6]])  # two strokes: the answer is for the whole drawing
    check_mnist_like(got["sent"])
    zero = check_page_matches(page, got)
    page.screenshot(path=str(tmp_path / "demo-zero.png"))
    if REAL:
        assert zero["label"] == "0", zero


def test_draw_with_a_finger(page: Any, tmp_path: Path) -> None:
    got = touch_stroke(page, ONE[0])
    check_mnist_like(got["sent"])
    view = check_page_matches(page, got)
    page.screenshot(path=str(tmp_path / "demo-touch.png"))
    if REAL:
        assert view["label"] == "1", view


def test_links_and_headers(page: Any, server: Server) -> None:
    assert page.get_attribute("#docs-link", "href") == "/docs"
    assert page.get_attribute("#dashboard-link", "href") == DASHBOARD
    docs = page.request.get(server.url + "/docs")
    assert docs.status == 200
    index = page.request.get(server.url + "/")
    assert "script-src 'self'" in index.headers["content-security-policy"]
    assert page.request.get(server.url + "/static/demo.js").headers["content-type"].startswith("text/javascript")
    assert page.request.get(server.url + "/static/nope.js").status == 404
    assert page.request.get(server.url + "/static/..%2Fdemo.py").status == 404
