"""Admin endpoints: list, load (hot swap) and unload model versions without a restart.

Protected by a bearer token (``MNIST_ADMIN_TOKEN``, compared in constant time). Without a token set the
endpoints are off and answer 404 like any unknown path. A load reads the version folder beside the
serving model, checks the contract and the golden set, warms it up, then swaps it in atomically; a
broken version is refused (422, naming why) and the old one keeps serving.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi import APIRouter, Query
from starlette.requests import Request

from service.errors import ModelLoadError, NotFound, ServiceError, Unauthorized
from service.inference import Core
from service.schemas import error_responses
from service.state import ServiceState

log = logging.getLogger("service.admin")

router = APIRouter(prefix="/admin", tags=["admin"])
_AUTH_DOC = "Needs `Authorization: Bearer <MNIST_ADMIN_TOKEN>`; 404 when no admin token is configured."


class ModelRefused(ServiceError):
    """A version failed its checks; nothing changed."""

    status_code = 422
    code = "model_refused"


def core_of(request: Request) -> Core:
    core: Core = request.app.state.core
    return core


def authorized(request: Request) -> ServiceState:
    svc = core_of(request).state
    token = svc.settings.admin_token
    if not token:
        raise NotFound("Not Found")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("a valid admin bearer token is required",
                           headers={"WWW-Authenticate": 'Bearer realm="admin"'})  # fmt: skip
    return svc


def _check_version(version: str) -> None:
    if not (version.isascii() and version.isdigit() and 0 < len(version) <= 12):
        raise NotFound(f"version {version[:16]!r} is not a version number (a positive integer)")


def _promoted(svc: ServiceState) -> str | None:
    try:
        return svc.registry.promoted_version()
    except ModelLoadError:  # a malformed pointer: the summary still answers
        return None


def _summary(svc: ServiceState) -> dict[str, Any]:
    reg = svc.registry
    return {
        "name": reg.name,
        "default_version": reg.default.version,
        "promoted_version": _promoted(svc),
        "loaded": [{"version": m.version, "sha256": m.sha256, "provider": m.provider} for m in reg.models],
        "available_versions": reg.available_versions(),
    }


@router.get("/models", summary="Loaded and available model versions", description=_AUTH_DOC,
            responses=error_responses(401, 404))  # fmt: skip
async def list_models(request: Request) -> dict[str, Any]:
    return _summary(authorized(request))


@router.post(
    "/models/{name}/versions/{version}/load",
    summary="Load a version, check it, warm it up and (by default) swap to it",
    description=_AUTH_DOC,
    responses=error_responses(401, 404, 422),
)
async def load(
    request: Request,
    name: str,
    version: str,
    default: bool = Query(True, description="Serve it by default; false = load it for versioned calls only."),
) -> dict[str, Any]:
    svc = authorized(request)
    _check_version(version)
    previous = svc.registry.default.version
    start = time.perf_counter()
    try:
        model = await svc.registry.load_version(version, make_default=default, name=name)
    except ModelLoadError as exc:
        reason = str(exc).replace(f"{svc.settings.model_repository}/", "")
        log.warning("model version refused", extra={"version": version, "reason": reason})
        raise ModelRefused(f"version {version} refused, still serving version {previous}: {reason}") from exc
    await core_of(request).calibrate(model)
    svc.publish_models()
    seconds = time.perf_counter() - start
    log.info("model version swapped in" if default else "model version loaded",
             extra={"version": version, "previous": previous, "seconds": round(seconds, 3)})  # fmt: skip
    return {"version": model.version, "sha256": model.sha256, "previous_default": previous,
            "seconds": round(seconds, 3), **_summary(svc)}  # fmt: skip


@router.post(
    "/models/{name}/versions/{version}/unload",
    summary="Unload a version that is not the default",
    description=_AUTH_DOC,
    responses=error_responses(401, 404, 409),
)
async def unload(request: Request, name: str, version: str) -> dict[str, Any]:
    svc = authorized(request)
    _check_version(version)
    await svc.registry.unload_version(version, name=name)
    svc.publish_models()
    return {"unloaded": version, **_summary(svc)}
