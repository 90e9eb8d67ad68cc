"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) that work with no network.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc its fonts from Google), so they are blank
on a machine without internet access. The same pages are served here from the assets shipped in the
``fastapi-offline`` package (Swagger UI 5 and ReDoc 2, refreshed with each release; MIT), which is only used
for its files: the HTML comes from FastAPI's own ``get_swagger_ui_html`` / ``get_redoc_html``, so the pages
look and behave exactly like FastAPI's defaults.

A Content-Security-Policy on the pages allows nothing but this origin (inline script and style are needed
by the FastAPI templates and Swagger UI; ReDoc starts a worker from a ``blob:`` URL), so a page can never
reach out to a CDN even if an asset tried to.
"""

from __future__ import annotations

import functools
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
#: Where the assets are served (under /docs, so metrics count them with the docs pages).
ASSETS_URL = "/docs/assets"
_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "cache-control": "no-cache"}
_ASSET_HEADERS = {"x-content-type-options": "nosniff", "cache-control": "public, max-age=86400"}


#: The one address ReDoc's bundle fetches by itself: the "API docs by Redocly" logo in its side menu. It is
#: pointed at an empty ``data:`` image instead; ReDoc then drops the logo (its ``onError`` hides it).
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


@functools.cache
def _asset(name: str) -> bytes:
    content = (ASSETS / name).read_bytes()
    if name == "redoc.standalone.js":
        content = content.replace(REDOC_LOGO, b"data:,")
    return content


def _with_headers(response: Response) -> Response:
    response.headers.update(_PAGE_HEADERS)
    return response


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add ``/docs``, ``/docs/oauth2-redirect``, ``/redoc`` and their assets to ``app``, served locally.

    Build the app with ``docs_url=None, redoc_url=None`` (FastAPI's CDN pages off) and call this once.
    The routes are left out of the OpenAPI document, like FastAPI's own.
    """
    missing = [name for name in _FILES if not (ASSETS / name).is_file()]
    if missing:  # a broken install: fail at start-up, not with a blank page later
        raise RuntimeError(f"fastapi-offline lacks {', '.join(missing)} in {ASSETS}")
    if app.openapi_url is None:
        raise ValueError("install_docs needs the app's OpenAPI document (openapi_url is None)")
    openapi_url = app.openapi_url
    oauth2_redirect_url = docs_url.rstrip("/") + "/oauth2-redirect"
    title = app.title

    async def swagger_ui(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return _with_headers(
            get_swagger_ui_html(
                openapi_url=root + openapi_url,
                title=f"{title} - Swagger UI",
                oauth2_redirect_url=root + oauth2_redirect_url,
                swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                # validatorUrl: no badge fetched from validator.swagger.io
                swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
            )
        )

    async def swagger_ui_redirect() -> Response:
        return _with_headers(get_swagger_ui_oauth2_redirect_html())

    async def redoc(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return _with_headers(
            get_redoc_html(
                openapi_url=root + openapi_url,
                title=f"{title} - ReDoc",
                redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                with_google_fonts=False,
            )
        )

    async def asset(name: str) -> Response:
        media_type = _FILES.get(name)
        if media_type is None:
            raise HTTPException(404, f"no docs asset {name!r}")
        return Response(_asset(name), media_type=media_type, headers=_ASSET_HEADERS)

    app.add_api_route(docs_url, swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route(oauth2_redirect_url, swagger_ui_redirect, methods=["GET"], include_in_schema=False)
    app.add_api_route(redoc_url, redoc, methods=["GET"], include_in_schema=False)
    app.add_api_route(ASSETS_URL + "/{name}", asset, methods=["GET"], include_in_schema=False)
