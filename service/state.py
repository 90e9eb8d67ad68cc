"""The state of one running service: its parts, built by the app's lifespan, and its lifecycle flags."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from service.batcher import Batcher
from service.feedback import Feedback
from service.logs import AccessLog
from service.metrics import Metrics
from service.quality import Quality
from service.registry import ModelRegistry
from service.settings import Settings

log = logging.getLogger("service")


@dataclass
class ServiceState:
    settings: Settings
    registry: ModelRegistry
    metrics: Metrics
    quality: Quality
    feedback: Feedback
    batcher: Batcher
    ready: bool = False
    draining: bool = False
    access_log: AccessLog | None = None
    warmup: asyncio.Task[None] | None = field(default=None)
    #: Called once when the drain begins (SIGTERM): other front-ends (gRPC) start their own drain at once.
    on_drain: list[Callable[[], None]] = field(default_factory=list)
    #: Called when the service becomes ready (warm): other front-ends update their health at once.
    on_ready: list[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings, registry: ModelRegistry) -> ServiceState:
        """Every part, wired: metrics on a fresh registry, quality and feedback collectors, the batcher."""
        metrics = Metrics()
        quality = Quality(registry.default.n_classes, settings.drift_window)
        quality.set_reference(registry.default.reference)
        feedback = Feedback(settings.feedback_window, settings.feedback_memory_bytes, settings.feedback_rate_per_s)
        metrics.registry.register(quality)
        metrics.registry.register(feedback)
        metrics.set_models(registry.models, registry.default)
        batcher = Batcher(
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue_images=settings.max_queue_images,
            metrics=metrics,
            observer=quality.record_batch,
            bulk_chunk_images=settings.bulk_chunk_images,
            max_bulk_queue_images=settings.max_bulk_queue_images,
            bulk_parallel=settings.bulk_parallel,
            inline_budget_s=settings.inline_budget_us / 1e6,
        )
        access_log = AccessLog() if settings.access_log else None
        return cls(settings, registry, metrics, quality, feedback, batcher, access_log=access_log)

    def set_ready(self) -> None:
        """Warm and not draining: readiness turns 200 (and the hooks tell the other front-ends)."""
        if not self.draining:
            self.ready = True
            self.metrics.ready.set(1)
            for hook in self.on_ready:
                hook()

    def begin_drain(self) -> None:
        """Readiness goes 503 first; responses then carry ``Connection: close``; new work is refused."""
        if not self.draining:
            self.draining = True
            self.ready = False
            self.metrics.ready.set(0)
            log.info("draining: readiness is now 503 and new work is refused")
            for hook in self.on_drain:
                hook()

    def publish_models(self) -> None:
        """After a change of the loaded set: model info metrics and the drift reference follow the default."""
        self.metrics.set_models(self.registry.models, self.registry.default)
        self.quality.set_reference(self.registry.default.reference)
