"""The browser demo: ``GET /`` (draw a digit, see the answer) and its assets under ``/static``.

Everything is in ``service/static`` (vanilla JS, no build step, no CDN). The page only talks to
``/v1/predict`` on the same origin, which the Content-Security-Policy below enforces.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from service.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "cache-control": "no-cache"}

router = APIRouter(include_in_schema=False)


@functools.cache
def _assets() -> dict[str, tuple[bytes, str]]:
    """The servable files (read once, on first use): name -> (content, media type). Nothing else is served."""
    return {
        p.name: (p.read_bytes(), _TYPES[p.suffix])
        for p in sorted(STATIC.iterdir())
        if p.is_file() and p.suffix in _TYPES and p.name != "index.html"
    }


@functools.cache
def _index_template() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")


def _safe_link(url: str) -> str:
    """Only http(s) links reach the page (no ``javascript:`` from a misconfigured setting)."""
    return url if url.lower().startswith(("http://", "https://")) else "#"


@router.get("/")
async def index(request: Request) -> Response:
    dashboard = html.escape(_safe_link(request.app.state.core.settings.dashboard_url), quote=True)
    page = _index_template().replace("{{dashboard_url}}", dashboard)
    return Response(page, media_type=_TYPES[".html"], headers=_HEADERS)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    asset = _assets().get(name)
    if asset is None:
        raise NotFound(f"no static file {name!r}")
    return Response(asset[0], media_type=asset[1], headers=_HEADERS)
