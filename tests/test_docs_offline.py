"""/docs (Swagger UI) and /redoc (ReDoc) of the real service render every operation in a real headless Chromium
with no network:
every request the pages make that is not to 127.0.0.1 is blocked and recorded, and none may be attempted."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from service.docs_assets import ASSETS_URL, CSP
from tests.helpers import assert_clean_shutdown, start_server

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def base_url(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real service (``python -m service.server``) on 127.0.0.1."""
    server = start_server(tiny_repo, tmp_path_factory.mktemp("docs-srv"))
    yield server.url
    assert_clean_shutdown(server)


@pytest.fixture(scope="module")
def operations(base_url: str) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in the OpenAPI document: what the pages must show."""
    spec = httpx.get(base_url + "/openapi.json", timeout=10).json()
    ops = {(m.upper(), p) for p, item in spec["paths"].items() for m in item if m != "parameters"}
    assert ("POST", "/v1/predict") in ops
    return ops


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


class OfflinePage:
    """A page whose every request off 127.0.0.1 is aborted and recorded; page errors are recorded too."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1200, "height": 900}, service_workers="block")
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)

    def _route(self, route: Any) -> None:
        url = route.request.url
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("internetdisconnected")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def offline(browser: Any) -> Iterator[OfflinePage]:
    pg = OfflinePage(browser)
    yield pg
    pg.close()


pytestmark = pytest.mark.browser


def test_swagger_ui_renders_every_operation_offline(
    offline: OfflinePage, base_url: str, operations: set[tuple[str, str]], tmp_path: Path
) -> None:
    page = offline.page
    page.goto(base_url + "/docs")
    page.wait_for_selector(".opblock-summary", timeout=30_000)
    shown = {
        (block.locator(".opblock-summary-method").inner_text().strip(),
         block.locator(".opblock-summary-path").get_attribute("data-path"))
        for block in page.locator(".opblock").all()
    }  # fmt: skip
    page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
    assert shown == operations
    assert page.locator(".info .title").inner_text().startswith("MNIST digit classifier")
    # An operation opens and shows its request body schema: Swagger UI's scripts run, not just its markup.
    page.locator(".opblock-summary-path[data-path='/v1/predict']").click()
    page.wait_for_selector(".opblock.is-open .opblock-section-request-body", timeout=10_000)
    assert offline.blocked == []
    assert offline.errors == []


def test_redoc_renders_every_operation_offline(
    offline: OfflinePage, base_url: str, operations: set[tuple[str, str]], tmp_path: Path
) -> None:
    page = offline.page
    page.goto(base_url + "/redoc")
    page.wait_for_selector("[data-section-id^='operation/']", timeout=30_000)
    sections = len(  # an operation with two tags is shown under each: count operations, not sections
        set(page.eval_on_selector_all("[data-section-id^='operation/']", "els => els.map(e => e.dataset.sectionId)"))
    )
    page.screenshot(path=str(tmp_path / "redoc.png"), full_page=True)
    assert sections == len(operations)
    text = page.locator("redoc").inner_text()
    for _, path in operations:
        assert path in text
    assert offline.blocked == []
    assert offline.errors == []


def test_the_blocking_is_real(offline: OfflinePage, base_url: str) -> None:
    """The guard the other tests rely on: a request off 127.0.0.1 is seen and refused."""
    page = offline.page
    page.goto(base_url + "/openapi.json")  # a document without a Content-Security-Policy
    page.evaluate("fetch('https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css').catch(() => null)")
    page.wait_for_timeout(200)
    assert offline.blocked == ["https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"]


def test_the_docs_pages_forbid_other_origins(offline: OfflinePage, base_url: str) -> None:
    """The pages' Content-Security-Policy refuses other origins before any request leaves the browser."""
    page = offline.page
    page.goto(base_url + "/docs")
    page.wait_for_selector(".opblock-summary", timeout=30_000)
    page.evaluate("fetch('https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css').catch(() => null)")
    page.wait_for_timeout(200)
    assert offline.blocked == []
    assert any("Content Security Policy" in e for e in offline.errors), offline.errors


def test_pages_and_assets(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for url in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            r = client.get(url)
            assert r.status_code == 200, url
            assert r.headers["content-type"].startswith("text/html")
            assert r.headers["content-security-policy"] == CSP
            assert "cdn." not in r.text, url
            assert "fonts.googleapis" not in r.text, url
        types = {
            "swagger-ui-bundle.js": "text/javascript",
            "swagger-ui.css": "text/css",
            "redoc.standalone.js": "text/javascript",
            "favicon.png": "image/png",
        }
        for name, media_type in types.items():
            r = client.get(f"{ASSETS_URL}/{name}")
            assert r.status_code == 200, name
            assert r.headers["content-type"].startswith(media_type)
            assert len(r.content) > 1000
        assert client.get(ASSETS_URL + "/nope.js").status_code == 404
        assert client.get(ASSETS_URL + "/..%2F..%2Fcore.py").status_code == 404
        spec = client.get("/openapi.json").json()
        assert not any(p.startswith(("/docs", "/redoc")) for p in spec["paths"])
