"""The set of loaded model versions and which one answers by default. Swaps are atomic."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from service.errors import ModelLoadError, NotFound, ServiceError
from service.model import Model, default_model_name, list_versions, load_model
from service.settings import Settings

log = logging.getLogger("service.registry")


class VersionInUse(ServiceError):
    """The default version cannot be unloaded."""

    status_code = 409
    code = "version_in_use"


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
        registry = cls(settings, name, {wanted: load_model(repo / name / wanted, settings)}, wanted)
        if settings.load_all_versions:
            for v in versions:
                if v != wanted:
                    try:
                        model = load_model(repo / name / v, settings)
                        registry._check_contract(model)
                    except ModelLoadError as exc:
                        log.error("skipping a broken version", extra={"version": v, "reason": str(exc)})
                    else:
                        registry._models[v] = model
        return registry

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

    def _check_version(self, name: str, version: str) -> None:
        if name != self.name:
            raise NotFound(f"model {name!r} is not served here (serving {self.name!r})")
        if not (version.isdigit() and 0 < len(version) <= 12) or version != str(int(version)):
            raise NotFound(f"version {version!r} is not a version number (a positive integer)")

    def _check_contract(self, model: Model) -> None:
        """A new version must keep what clients rely on: input size, image shape, class labels."""
        cur = self._default
        mine = (model.n_features, model.image_shape, model.n_classes, model.class_labels)
        theirs = (cur.n_features, cur.image_shape, cur.n_classes, cur.class_labels)
        if mine != theirs:
            raise ModelLoadError(
                f"version {model.version} changes the contract: input {model.n_features} "
                f"{list(model.image_shape)}, labels {model.class_labels}; serving input {cur.n_features} "
                f"{list(cur.image_shape)}, labels {cur.class_labels}"
            )

    async def load_version(self, version: str, *, make_default: bool = True, name: str | None = None) -> Model:
        """Load a version beside the others, validate it (contract + golden set), warm it up, then swap.

        The swap is one assignment of the default and of a fresh dict: a request reads either the old or
        the new model, never a half-built one; batches already queued on the old model finish on it.
        A broken version raises ModelLoadError (or NotFound) and leaves what is served untouched.
        """
        self._check_version(self.name if name is None else name, version)
        async with self._lock:
            folder = Path(self.settings.model_repository) / self.name / version
            if not folder.is_dir():
                raise NotFound(f"no folder for version {version} of {self.name!r} in the model repository")
            model = await asyncio.to_thread(load_model, folder, self.settings)
            if model.name != self.name or model.version != version:
                raise ModelLoadError(f"metadata names {model.name}/{model.version}, expected {self.name}/{version}")
            self._check_contract(model)
            await asyncio.to_thread(model.warm_up, self.settings.largest_batch)
            self._models = {**self._models, version: model}
            if make_default:
                self._default = model
            log.info("model version loaded", extra={"version": version, "default": make_default})
            return model

    async def unload_version(self, version: str, *, name: str | None = None) -> Model:
        """Forget a loaded version (not the default one). Requests already queued on it still finish."""
        self._check_version(self.name if name is None else name, version)
        async with self._lock:
            model = self._models.get(version)
            if model is None:
                raise NotFound(f"version {version} of {self.name!r} is not loaded")
            if model is self._default:
                raise VersionInUse(f"version {version} is the default version; load another one first")
            self._models = {v: m for v, m in self._models.items() if v != version}
            log.info("model version unloaded", extra={"version": version})
            return model
