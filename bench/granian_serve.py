"""The service (or the bare ASGI canned answer) under granian, a Rust HTTP server, for ``mnist-bench``.

    python -m bench.granian_serve --port 8102      # the service app, settings from the MNIST_* environment

The app is the very one ``mnist-serve`` runs (``service.app.create_app`` wrapped in the in-flight limit by
``service.server.build_config``), with the same settings, model and event loop; only the HTTP server
differs. granian's own limits are set to the service's: header read timeout (``MNIST_HEADER_TIMEOUT_S``),
request buffer (``MNIST_MAX_HEADER_BYTES`` plus 8 KiB), backpressure (``MNIST_MAX_INFLIGHT_REQUESTS``).
The service's connection guards (service/guards.py) are a uvicorn protocol class and do not apply here:
``python -m bench.granian_guards`` checks what granian itself does with the same hostile connections.

granian runs one worker process beside its supervisor; the bench measures the CPU of both and the memory
of the worker (and of both together).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from granian.constants import Interfaces, Loops
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server import Server

from service.settings import settings_from_args


def service_app() -> Any:
    """Factory run in granian's worker: the service app exactly as ``mnist-serve`` builds it."""
    from service import logs
    from service.app import create_app
    from service.registry import ModelRegistry
    from service.server import build_config

    settings = settings_from_args([])
    logs.configure(settings.log_level)
    app = create_app(settings, ModelRegistry.load(settings))
    return build_config(settings, app).app  # the in-flight limit around the app, as under uvicorn


def serve_granian(target: str, host: str, port: int, loop: str, *, factory: bool) -> None:
    s = settings_from_args([])
    http1 = HTTP1Settings(
        header_read_timeout=int(s.header_timeout_s * 1000),
        keep_alive=True,
        max_buffer_size=max(8192, s.max_header_bytes + 8192),
    )
    server = Server(
        target,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=1,
        loop=Loops(loop),
        http1_settings=http1,
        backpressure=s.max_inflight_requests or None,
        log_enabled=True,
        log_level=LogLevels.warning,
        log_access=False,
        factory=factory,
        websockets=False,
    )
    server.serve()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.granian_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--app", choices=("service", "asgi"), default="service", help="What to serve.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default=None,
                   help="Event loop (default: the service's, MNIST_EVENT_LOOP or its default).")  # fmt: skip
    args = p.parse_args(argv)
    loop = args.loop or settings_from_args([]).event_loop
    if args.app == "service":
        serve_granian("bench.granian_serve:service_app", args.host, args.port, loop, factory=True)
    else:
        serve_granian("bench.baselines:asgi_app", args.host, args.port, loop, factory=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
