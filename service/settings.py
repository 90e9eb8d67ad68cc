"""Service settings: environment variables with the ``MNIST_`` prefix, overridable by CLI flags.

A wrong value, from the environment or a flag, raises ``InvalidSettings`` with one line per problem naming
the variable or flag (``mnist-serve`` prints them and exits 2); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

ENV_PREFIX = "MNIST_"
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Every knob of the service. Defaults were chosen by measurement (docs/performance.md)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", protected_namespaces=())

    # Network
    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC front-end port (Open Inference Protocol); 0 = off.")

    # Model
    model_repository: Path = Field(Path("models"), description="Folder holding <name>/<version>/model.onnx.")
    model_name: str | None = Field(
        None, description="Model to serve (default: the only one in the repository, else the first by name)."
    )
    model_version: str = Field(
        "promoted",
        description="Version served by default: 'promoted' (the repository's promoted.json, set with "
        "mnist-promote), 'latest' (the highest) or a number.",
    )
    load_all_versions: bool = Field(False, description="Also load every other version for versioned calls.")
    model_precision: Literal["float32", "int8"] = Field(
        "float32", description="int8: serve each version's quantized variant (mnist-export --quantize)."
    )

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
    bulk_chunk_images: int = Field(512, ge=1, description="Bulk requests run in engine calls of this many images.")
    bulk_parallel: int = Field(
        0,
        ge=0,
        le=64,
        description="Bulk engine threads (0 = one per usable core: the CPU affinity capped by a cgroup CPU quota). "
        "They run at nice +19, pinned one per CPU when they match the CPUs; all of them while no single image "
        "arrived in the last 0.1 s, one fewer while single images keep arriving, one while one waits.",
    )
    inline_budget_us: float = Field(
        500.0,
        ge=0,
        le=10000,
        description="A batch measured at warm-up to cost less than this runs on the event loop when the engine is "
        "idle (0 = never); it bounds the loop's stall (a hand-off costs more CPU than such a batch).",
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of a request that states none; queued past it: 504."
    )
    max_deadline_s: float = Field(
        60.0, gt=0, description="Longest deadline a caller may state (X-Request-Deadline-Ms, OIP timeout, gRPC)."
    )

    # Limits
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body (413 above).")
    max_images_per_request: int = Field(4096, ge=1, description="Most images in one batch request.")
    max_json_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1024,
        description="Largest JSON body (413 above; about 400 digits): JSON carries an image in 6-18x the bytes of "
        "uint8 and decoding it takes about 6.5x its size in memory at its peak; bulk belongs in .npy or raw uint8.",
    )
    max_png_pixels: int = Field(4096 * 4096, ge=784, description="Largest PNG (width*height) decoded.")
    grpc_max_message_bytes: int | None = Field(
        None, ge=1024, description="Largest gRPC request message (RESOURCE_EXHAUSTED above); unset = max_body_bytes."
    )

    # Lifecycle and operations
    drain_timeout_s: float = Field(20.0, ge=0, description="Grace period after SIGTERM before exit.")
    admin_token: str | None = Field(None, description="Bearer token for /admin endpoints (off if unset).")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Allowed CORS origins, comma-separated or a JSON list (CORS is off if none).",
    )
    log_level: LogLevel = Field("info", description="Log level of the JSON logs.")
    access_log: bool = Field(True, description="One JSON access-log line per request.")
    feedback_window: int = Field(1000, ge=1, description="Feedback samples in the rolling accuracy.")
    feedback_token: str | None = Field(
        None, description="Bearer token required by /v1/feedback (open if unset; set it for untrusted clients)."
    )
    feedback_rate_per_s: float = Field(20.0, ge=0, description="Feedback calls per second per client (0 = no limit).")
    feedback_memory_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="Memory for remembered predictions that feedback can score: 64 bytes buys one prediction "
        "(8 MiB: the last 131,072 predictions, fewer when batches hold many images).",
    )
    drift_window: int = Field(2000, ge=10, description="Recent images in the drift window.")
    dashboard_url: str = Field("http://127.0.0.1:3000", description="Grafana link shown on the demo page.")

    # Connection-level limits (service/guards.py, service/server.py; docs/security.md)
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="Largest request line + headers (431 above).")
    header_timeout_s: float = Field(10.0, gt=0, description="Request headers must arrive within this (408 after).")
    body_timeout_s: float = Field(
        10.0, gt=0, description="A request body must fully arrive within this (400 body_timeout / closed)."
    )
    body_hold_bytes: int = Field(
        1024 * 1024, ge=0, description="Request bodies up to this size reach the app whole (0: 64 KiB at a time)."
    )
    timeout_keep_alive_s: int = Field(5, ge=1, description="Idle keep-alive connections close after this.")
    max_inflight_body_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Request bodies (by declared size; JSON weighs 6x) being received or processed at once; "
        "beyond it: 503 before the body is read.",
    )
    refusal_delay_s: float = Field(
        1.0,
        ge=0,
        le=10,
        description="Seconds a 503 of the in-flight limits is held (reading paused, up to 1,024 connections), like its "
        "Retry-After: clients retrying at once cannot keep the event loop busy refusing; 0 answers at once.",
    )
    max_inflight_requests: int = Field(
        1024,
        ge=0,
        description="Inference requests processed at once; beyond it: 503, decided from the headers (0 = no limit).",
    )
    gc_tuning: bool = Field(
        True,
        description="After warm-up, freeze start-up objects (gc.freeze) and collect the young generation every 10,000 "
        "allocations, not 700: full collections otherwise pause the loop to walk every start-up object.",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "asyncio",
        description="asyncio: fair to new connections under overload; uvloop: no consistent gain here "
        "(docs/performance.md), and it starves new connections while many busy ones are open (docs/reliability.md).",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        """``https://a,https://b``, ``["https://a", "https://b"]`` (JSON) or a list (flags); blanks dropped."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON list ({exc.msg}); or give comma-separated origins") from exc
            else:
                value = [text]
        if isinstance(value, list | tuple):
            return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def largest_batch(self) -> int:
        """The most images one engine call can get: what warm-up must cover."""
        return max(self.max_batch_size, self.bulk_chunk_images)


class InvalidSettings(Exception):
    """Settings that cannot be used; ``problems`` holds one line per problem, each naming its variable/flag."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _choices(annotation: Any) -> tuple[str, ...] | None:
    """The allowed values of a ``Literal[...]`` setting (None for any other type)."""
    if typing.get_origin(annotation) is Literal:
        return tuple(str(v) for v in typing.get_args(annotation))
    return None


def _help(description: str | None, default: object) -> str:
    text = description or ""
    if default is not None:
        text += f" (default: {default})"
    elif not any(word in text.lower() for word in ("default", "unset")):
        text += " (default: unset)"
    return text.replace("%", "%%")  # argparse formats help with %


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line, like every other settings error (argparse would print the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting; a Literal setting lists its allowed values."""
    parser = _Parser(
        prog="mnist-serve",
        description="Serve the MNIST ONNX model over HTTP. Every flag can also be set as MNIST_<NAME>.",
    )
    for name, field in Settings.model_fields.items():
        kw: dict[str, Any] = {"dest": name, "default": None}
        kw["help"] = _help(
            field.description, "none" if name == "cors_origins" else field.get_default(call_default_factory=True)
        )
        if choices := _choices(field.annotation):
            kw |= {"choices": choices, "type": str.lower if name == "log_level" else str}
        elif field.annotation is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif name == "cors_origins":
            kw |= {"nargs": "*", "metavar": "ORIGIN"}
        parser.add_argument(_flag(name), **kw)
    return parser


def _shown(name: str, value: Any) -> str:
    if "token" in name:  # never echo a secret
        return "***"
    text = " ".join(value) if isinstance(value, list) else str(value)
    return repr(text if len(text) <= 60 else text[:60] + "...")


def _origin(name: str, overrides: dict[str, Any]) -> str:
    """Where a setting's value came from: its flag, its environment variable, or (neither) its name."""
    if name in overrides:
        return f"{_flag(name)} {_shown(name, overrides[name])}"
    env = _env(name)
    matches = [k for k in os.environ if k.upper() == env]  # pydantic-settings matches names case-insensitively
    if matches:
        return f"{matches[0]}={_shown(name, os.environ[matches[0]])}"
    return name


def problems_of(exc: ValidationError | SettingsError, overrides: dict[str, Any]) -> list[str]:
    """One line per problem, each naming the flag or variable and the setting, without pydantic's boilerplate."""
    if isinstance(exc, SettingsError):  # a value pydantic-settings could not even decode
        cause = exc.__cause__
        for name in Settings.model_fields:
            if f'"{name}"' in str(exc):
                return [f"{_origin(name, overrides)}: cannot be parsed ({cause or exc}) (setting {name})"]
        return [str(exc)]
    lines = []
    for err in exc.errors(include_url=False):
        loc = err.get("loc", ())
        name = str(loc[0]) if loc else ""
        msg = err.get("msg", "invalid value")
        msg = msg.removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        if name in Settings.model_fields:
            lines.append(f"{_origin(name, overrides)}: {msg} (setting {name})")
        else:
            lines.append(f"{name or 'settings'}: {msg}")
    return lines


def settings_from_args(argv: list[str] | None = None) -> Settings:
    """Environment first, then CLI flags on top. Raises ``InvalidSettings`` (argparse exits 2 by itself)."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**overrides)
    except (ValidationError, SettingsError) as exc:
        raise InvalidSettings(problems_of(exc, overrides)) from None
