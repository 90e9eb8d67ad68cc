"""One small error hierarchy and the one place error bodies are built.

Every error knows its HTTP status and a stable machine-readable code; transports turn it into their wire shape:
``error_json`` for the service's own routes, ``oip_error_json`` for the Open Inference Protocol, and the gRPC
front-end maps ``status_code`` to a gRPC status with the same message.
"""

from __future__ import annotations

import orjson


def error_json(code: str, message: str, request_id: str | None) -> bytes:
    """``{"error": {"code", "message", "request_id"}}``: the body of every error of the service's own routes."""
    return orjson.dumps({"error": {"code": code, "message": message, "request_id": request_id}})


def oip_error_json(message: str) -> bytes:
    """``{"error": "message"}``: the Open Inference Protocol's error body."""
    return orjson.dumps({"error": message})


class ServiceError(Exception):
    """Base class. ``message`` is safe to show to clients: no paths, no stack traces."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidInput(ServiceError):
    status_code = 422
    code = "invalid_input"

    def __init__(self, message: str, *, code: str = "invalid_input") -> None:
        super().__init__(message)
        self.code = code


class MalformedBody(InvalidInput):
    status_code = 400

    def __init__(self, message: str, *, code: str = "malformed_body") -> None:
        super().__init__(message, code=code)


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class TooManyRequests(ServiceError):
    """A per-client rate limit was exceeded."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after_s + 0.499)))})


class ClientDisconnected(ServiceError):
    """The caller went away while its work waited; the work was dropped unrun (nobody reads this answer)."""

    status_code = 499
    code = "client_disconnected"


class Overloaded(ServiceError):
    """Admission refused: the queue is full or cannot finish in the client's deadline."""

    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float, code: str = "overloaded") -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after_s + 0.499)))})
        self.code = code


class Draining(ServiceError):
    status_code = 503
    code = "draining"

    def __init__(self) -> None:
        super().__init__("the service is shutting down; retry on another replica", headers={"Retry-After": "1"})


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"


class DeadlineExceeded(ServiceError):
    status_code = 504
    code = "deadline_exceeded"


class EngineError(ServiceError):
    """Inference failed. The message is generic; the cause is logged once with ``error_id``."""

    status_code = 500
    code = "inference_failed"

    def __init__(self, error_id: str) -> None:
        super().__init__(f"inference failed (error id {error_id})")
        self.error_id = error_id


class ModelLoadError(Exception):
    """A model file is missing, corrupt or breaks the contract. Raised at start-up or on a hot load."""
