"""The set of loaded model versions and which one answers by default. Swaps are atomic."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from service.errors import ModelLoadError, NotFound, ServiceError
from service.model import Model, load_model
from service.repository import default_model_name, list_versions, promoted_version
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
        """Load the configured version (and, on request, every other one). Raises ModelLoadError.

        ``model_version``: ``promoted`` (the version ``<repo>/<name>/promoted.json`` names; the highest one,
        with a warning, when the model has no pointer yet), ``latest`` (the highest) or a version number.
        """
        repo = Path(settings.model_repository)
        name = settings.model_name or default_model_name(repo)
        versions = list_versions(repo, name)
        if not versions:
            raise ModelLoadError(f"model {name!r} has no version folder in {repo}")
        promoted = promoted_version(repo, name)
        wanted = settings.model_version
        if wanted == "promoted":
            if promoted is None:
                wanted = versions[-1]
                log.warning(
                    "no promoted version; serving the highest (promote one with mnist-promote)",
                    extra={"model": name, "version": wanted},
                )
            elif promoted not in versions:
                raise ModelLoadError(
                    f"the promoted version {promoted} of {name!r} has no folder in {repo} "
                    f"(found: {', '.join(versions)}); promote another one with mnist-promote"
                )
            else:
                wanted = promoted
        elif wanted == "latest":
            wanted = versions[-1]
        if wanted not in versions:
            raise ModelLoadError(f"model {name!r} has no version {wanted} in {repo} (found: {', '.join(versions)})")
        if promoted is not None and wanted != promoted:
            log.warning(
                "serving a version that is not the promoted one",
                extra={"model": name, "version": wanted, "promoted": promoted},
            )
        registry = cls(settings, name, {wanted: load_model(repo / name / wanted, settings, repository=repo)}, wanted)
        if settings.load_all_versions:
            for v in versions:
                if v != wanted:
                    try:
                        model = load_model(repo / name / v, settings, repository=repo)
                        registry._check_contract(model)
                    except ModelLoadError as exc:
                        log.error("skipping a broken version", extra={"version": v, "reason": str(exc)})
                    else:
                        registry._models[v] = model
        return registry

    def promoted_version(self) -> str | None:
        """The version the repository's promoted pointer names (None: no pointer). ModelLoadError if malformed."""
        return promoted_version(Path(self.settings.model_repository), self.name)

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
            repo = Path(self.settings.model_repository)
            model = await asyncio.to_thread(load_model, folder, self.settings, repository=repo)
            self._check_contract(model)
            await asyncio.to_thread(model.warm_up, self.settings.largest_batch)
            self._models = {**self._models, version: model}
            if make_default:
                self._default = model
                self._warn_if_not_promoted(version)
            log.info("model version loaded", extra={"version": version, "default": make_default})
            return model

    def _warn_if_not_promoted(self, version: str) -> None:
        try:
            promoted = self.promoted_version()
        except ModelLoadError as exc:
            log.warning("the promoted-version pointer is unreadable", extra={"reason": str(exc)})
            return
        if promoted is not None and promoted != version:
            log.warning(
                "serving a version that is not the promoted one",
                extra={"model": self.name, "version": version, "promoted": promoted},
            )

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
