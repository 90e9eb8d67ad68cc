"""One small error hierarchy: every error knows its HTTP status and a stable machine-readable code."""

from __future__ import annotations


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
