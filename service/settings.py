"""Service settings: environment variables with the ``MNIST_`` prefix, overridable by CLI flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service. Defaults were chosen by measurement (docs/performance.md)."""

    model_config = SettingsConfigDict(env_prefix="MNIST_", extra="ignore", protected_namespaces=())

    # Network
    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    grpc_port: int = Field(
        0, ge=0, le=65535, description="TCP port of the gRPC front-end (Open Inference Protocol); 0 = off."
    )

    # Model
    model_repository: Path = Field(Path("models"), description="Folder holding <name>/<version>/model.onnx.")
    model_name: str | None = Field(None, description="Model to serve; default: the only/first in the repo.")
    model_version: str = Field("latest", description="Version served by default ('latest' = highest).")
    load_all_versions: bool = Field(False, description="Also load every other version for versioned calls.")

    # ONNX Runtime
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available, else CPU; cuda: refuse to start without CUDA."
    )
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime intra-op threads (0 = ORT default).")
    inter_op_threads: int = Field(1, ge=0, description="ONNX Runtime inter-op threads (0 = ORT default).")
    allow_spinning: bool = Field(False, description="Let ORT worker threads spin-wait (costs idle CPU).")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level."
    )

    # Batching and admission
    max_batch_size: int = Field(256, ge=1, le=65536, description="Most images in one engine call.")
    max_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="Extra wait to fill a batch; 0 = run what is queued at once."
    )
    max_queue_images: int = Field(4096, ge=1, description="Single-image work allowed to wait; beyond it: 503.")
    max_bulk_queue_images: int = Field(16384, ge=1, description="Bulk images allowed to wait; beyond it: 503.")
    bulk_chunk_images: int = Field(1024, ge=1, description="Bulk requests run in engine calls of this many images.")
    pipeline_depth: int = Field(
        2, ge=1, le=8, description="Engine calls handed to the inference thread ahead (2: it never idles)."
    )
    request_timeout_s: float = Field(10.0, gt=0, description="A request queued longer than this gets 504.")

    # Limits
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body (413 above).")
    max_images_per_request: int = Field(4096, ge=1, description="Most images in one batch request.")
    max_png_pixels: int = Field(4096 * 4096, ge=784, description="Largest PNG (width*height) decoded.")
    grpc_max_message_bytes: int | None = Field(
        None, ge=1024, description="Largest gRPC request message (RESOURCE_EXHAUSTED above); unset = max_body_bytes."
    )

    # Lifecycle and operations
    drain_timeout_s: float = Field(20.0, ge=0, description="Grace period after SIGTERM before exit.")
    admin_token: str | None = Field(None, description="Bearer token for /admin endpoints (off if unset).")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins (off if empty).")
    log_level: str = Field("info", description="Log level.")
    access_log: bool = Field(True, description="One JSON access-log line per request.")
    feedback_window: int = Field(1000, ge=1, description="Feedback samples in the rolling accuracy.")
    drift_window: int = Field(2000, ge=10, description="Recent images in the drift window.")
    dashboard_url: str = Field("http://127.0.0.1:3000", description="Grafana link shown on the demo page.")

    # Connection-level limits (service/guards.py, service/server.py; docs/security.md)
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="Largest request line + headers (431 above).")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection must send complete request headers within this (408 after)."
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="A request body must fully arrive within this (400 body_timeout / closed)."
    )
    timeout_keep_alive_s: int = Field(5, ge=1, description="Idle keep-alive connections close after this.")
    max_inflight_requests: int = Field(
        1024, ge=0, description="Inference requests processed at once; beyond it: 503 at once (0 = no limit)."
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "asyncio",
        description="asyncio: fair to new connections under overload; uvloop: ~10% more peak throughput, but "
        "starves new connections (probes included) while many busy ones are open (docs/reliability.md).",
    )

    @property
    def largest_batch(self) -> int:
        """The most images one engine call can get: what warm-up must cover."""
        return max(self.max_batch_size, self.bulk_chunk_images)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(description: str | None, default: object) -> str:
    return f"{description} (default: {default})".replace("%", "%%")  # argparse formats help with %


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting; defaults shown come from the environment."""
    parser = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve the MNIST ONNX model over HTTP. Every flag can also be set as MNIST_<NAME>.",
    )
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if field.annotation is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=_help(field.description, default),
            )
        elif name == "cors_origins":
            parser.add_argument(_flag(name), dest=name, nargs="*", default=None, help=_help(field.description, "none"))
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=_help(field.description, default))
    return parser


def settings_from_args(argv: list[str] | None = None) -> Settings:
    """Environment first, then CLI flags on top."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)
