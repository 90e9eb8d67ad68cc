"""The set of loaded model versions and which one answers by default. Swaps are atomic."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from service.errors import ModelLoadError, NotFound
from service.model import Model, default_model_name, list_versions, load_model
from service.settings import Settings

log = logging.getLogger("service.registry")


class ModelRegistry:
    def __init__(self, settings: Settings, name: str, models: dict[str, Model], default: str) -> None:
        self.settings = settings
        self.name = name
        self._models = models
        self._default = models[default]
        self._lock = asyncio.Lock()

    @classmethod
    def load(cls, settings: Settings) -> ModelRegistry:
        """Load the configured version (and, on request, every other one). Raises ModelLoadError."""
        repo = Path(settings.model_repository)
        name = settings.model_name or default_model_name(repo)
        versions = list_versions(repo, name)
        if not versions:
            raise ModelLoadError(f"model {name!r} has no version folder in {repo}")
        wanted = versions[-1] if settings.model_version == "latest" else settings.model_version
        if wanted not in versions:
            raise ModelLoadError(f"model {name!r} has no version {wanted} in {repo} (found: {', '.join(versions)})")
        models = {wanted: load_model(repo / name / wanted, settings)}
        if settings.load_all_versions:
            for v in versions:
                if v != wanted:
                    try:
                        models[v] = load_model(repo / name / v, settings)
                    except ModelLoadError as exc:
                        log.error("skipping a broken version", extra={"version": v, "reason": str(exc)})
        return cls(settings, name, models, wanted)

    @property
    def default(self) -> Model:
        return self._default

    @property
    def models(self) -> list[Model]:
        return [self._models[v] for v in sorted(self._models, key=int)]

    def available_versions(self) -> list[str]:
        return list_versions(Path(self.settings.model_repository), self.name)

    def get(self, name: str | None = None, version: str | None = None) -> Model:
        if name is not None and name != self.name:
            raise NotFound(f"model {name!r} is not served here (serving {self.name!r})")
        if version is None:
            return self._default
        model = self._models.get(version)
        if model is None:
            raise NotFound(f"version {version!r} of {self.name!r} is not loaded")
        return model

    async def load_version(self, version: str, *, make_default: bool = True) -> Model:
        """Load a version beside the others, validate it (contract + golden set), warm it up, then swap.

        A broken version raises ModelLoadError and leaves what is served untouched.
        """
        async with self._lock:
            folder = Path(self.settings.model_repository) / self.name / version
            if not folder.is_dir():
                raise ModelLoadError(f"no folder for version {version}")
            model = await asyncio.to_thread(load_model, folder, self.settings)
            if model.name != self.name or model.version != version:
                raise ModelLoadError(f"metadata names {model.name}/{model.version}, expected {self.name}/{version}")
            current = self._default
            if (model.n_features, model.n_classes) != (current.n_features, current.n_classes):
                raise ModelLoadError(
                    f"version {version} changes the contract: {model.n_features}->{model.n_classes}, "
                    f"serving {current.n_features}->{current.n_classes}"
                )
            await asyncio.to_thread(model.warm_up, self.settings.max_batch_size)
            self._models = {**self._models, version: model}
            if make_default:
                self._default = model
            log.info("model version loaded", extra={"version": version, "default": make_default})
            return model
