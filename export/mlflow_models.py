"""MLflow as the model registry: ``mnist-export`` registers each exported version, ``mnist-pull`` brings a
registered version (by number or alias, e.g. ``champion``) back into a local model repository.

A registered version's source is the ``onnx/<local version>/`` artifact folder of its training run: the very
``model.onnx``, ``metadata.json`` (and ``model.int8.onnx``) the export wrote. ``mnist-pull`` downloads it,
checks it exactly as the service loads a version (``service.model.load_model``) in a staging folder, and only
then renames it into ``<repository>/<name>/<version>/``, ready to hot-load or promote. The service itself
never imports MLflow.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.repository import staged_version
from service.errors import ModelLoadError
from service.model import MAX_MODEL_BYTES, load_model
from service.repository import MAX_METADATA_BYTES, METADATA_FILE, read_bounded
from service.settings import Settings
from training.data import file_sha256
from training.tracking import ONNX_ARTIFACT_DIR, client, tracking_uri

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"[1-9][0-9]{0,11}")


class PullError(ExportError):
    """The registered version cannot be pulled; the message says why."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class Pulled:
    folder: Path
    name: str
    version: str
    registered: RegisteredVersion
    already_present: bool


def artifact_path(local_version: str | int) -> str:
    """Where the export logs a version's files in its run: ``onnx/<version>`` (one folder per export)."""
    return f"{ONNX_ARTIFACT_DIR}/{local_version}"


def register(run_id: str, meta: dict[str, Any], registered_name: str, aliases: Sequence[str] = ()) -> RegisteredVersion:
    """Register the run's ``onnx/<version>/`` folder as a new version of ``registered_name``, set ``aliases``."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    try:
        run = mlflow_client.get_run(run_id)
        try:
            mlflow_client.get_registered_model(registered_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            mlflow_client.create_registered_model(
                registered_name, description="MNIST digit classifier: ONNX model + metadata.json for mnist-serving"
            )
        tags = {
            "repository_name": str(meta["name"]),
            "repository_version": str(meta["version"]),
            "sha256": str(meta.get("sha256")),
        }
        for tag, value in (("test_accuracy", meta.get("test_accuracy")),
                           ("int8_test_accuracy", meta.get("quantized", {}).get("test_accuracy"))):  # fmt: skip
            if isinstance(value, float):
                tags[tag] = f"{value:.4f}"
        version = mlflow_client.create_model_version(
            registered_name,
            source=f"{run.info.artifact_uri}/{artifact_path(meta['version'])}",
            run_id=run_id,
            tags=tags,
            description=f"models/{meta['name']}/{meta['version']} exported by mnist-export",
        )
        for alias in aliases:
            mlflow_client.set_registered_model_alias(registered_name, alias, version.version)
    except MlflowException as exc:
        raise ExportError(f"cannot register the model in MLflow ({tracking_uri()}): {exc.message}") from exc
    return RegisteredVersion(registered_name, str(version.version), tuple(aliases))


def _find(registered_name: str, version: str | None, alias: str | None) -> tuple[RegisteredVersion, str]:
    """(the registered version, its download URI)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    try:
        if alias is not None:
            found = mlflow_client.get_model_version_by_alias(registered_name, alias)
        else:
            found = mlflow_client.get_model_version(registered_name, str(version))
        uri = mlflow_client.get_model_version_download_uri(registered_name, found.version)
    except MlflowException as exc:
        which = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise PullError(f"MLflow ({tracking_uri()}) has no {which} of the registered model {registered_name!r}: "
                        f"{exc.message}") from exc  # fmt: skip
    return RegisteredVersion(registered_name, str(found.version), tuple(found.aliases or ())), uri


def _download(uri: str, workdir: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(workdir), tracking_uri=tracking_uri())
        )
    except (MlflowException, OSError) as exc:
        raise PullError(f"cannot download {uri}: {exc}") from exc


def _read_metadata(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads(read_bounded(folder / METADATA_FILE, MAX_METADATA_BYTES, "metadata"))
    except ModelLoadError as exc:
        raise PullError(f"the registered version has no usable {METADATA_FILE}: {exc}") from exc
    except ValueError as exc:
        raise PullError(f"the registered version's {METADATA_FILE} is not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise PullError(f"the registered version's {METADATA_FILE} is not a JSON object")
    return meta


def _copy_files(source: Path, folder: Path) -> None:
    """Copy the downloaded files (regular files only, each within the model size bound) into ``folder``."""
    for path in sorted(source.iterdir()):
        if path.is_symlink() or not path.is_file():
            raise PullError(f"the registered version holds {path.name!r}, which is not a regular file")
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise PullError(f"the registered version's {path.name} is larger than {MAX_MODEL_BYTES} bytes")
        shutil.copyfile(path, folder / path.name)


def pull(
    registered_name: str,
    repository: Path,
    *,
    version: str | None = None,
    alias: str | None = None,
    local_version: str | None = None,
) -> Pulled:
    """Download a registered version into ``repository``, validated as the service validates a version."""
    if (version is None) == (alias is None):
        raise PullError("give either a registered version number or an alias")
    registered, uri = _find(registered_name, version, alias)
    with tempfile.TemporaryDirectory(prefix="mnist-pull-") as work:
        downloaded = _download(uri, Path(work))
        meta = _read_metadata(downloaded)
        name, recorded = meta.get("name"), meta.get("version")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise PullError(f"the registered version's metadata names no usable model name: {name!r}")
        target_version = local_version if local_version is not None else recorded
        if not isinstance(target_version, str) or not _VERSION.fullmatch(target_version):
            raise PullError(f"not a version number (a positive integer): {target_version!r}")
        target = repository / name / target_version
        if target.exists():
            existing = target / str(meta.get("file", "model.onnx"))
            if existing.is_file() and file_sha256(existing) == meta.get("sha256"):
                return Pulled(target, name, target_version, registered, already_present=True)
            raise PullError(f"{target} already exists with another model; pull it as another version (--as-version N)")
        meta["version"] = target_version
        meta["mlflow_registered_model"] = {"name": registered.name, "version": registered.version, "alias": alias}
        with staged_version(repository, name, int(target_version)) as staging:
            _copy_files(downloaded, staging)
            (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            try:
                load_model(staging, Settings.model_validate({"provider": "cpu"}), repository=repository,
                           expected=(name, target_version))  # fmt: skip
            except ModelLoadError as exc:
                raise PullError(
                    f"registered version {registered.version} of {registered_name!r} is refused: {exc}"
                ) from exc
    return Pulled(target, name, target_version, registered, already_present=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mnist-pull",
        description="Pull a model version registered in MLflow (by version number or alias) into the local "
        "model repository, checked exactly as the service checks a version. MLFLOW_TRACKING_URI picks the server.",
    )
    p.add_argument("registered_model", help="registered model name in MLflow, e.g. mnist-mlp")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="registered version number")
    which.add_argument("--alias", help="registered alias, e.g. champion")
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository root")
    p.add_argument(
        "--as-version",
        dest="local_version",
        default=None,
        help="local version number (default: the one it was exported as)",
    )
    p.add_argument("--promote", action="store_true", help="also make it the promoted version (mnist-promote)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from export.promote import PromoteError, promote

    try:
        pulled = pull(args.registered_model, args.repository, version=args.version, alias=args.alias,
                      local_version=args.local_version)  # fmt: skip
        reg = pulled.registered
        state = "already in the repository" if pulled.already_present else "pulled and checked"
        print(f"{pulled.folder}: {state} (MLflow {reg.name} version {reg.version}"
              f"{', aliases ' + ', '.join(reg.aliases) if reg.aliases else ''})")  # fmt: skip
        if args.promote:
            done = promote(args.repository, pulled.name, pulled.version, command="mnist-pull --promote")
            print(f"{pulled.name}: promoted version {done.version} (was {done.previous or 'none'})")
    except (ExportError, PromoteError) as exc:
        print(f"mnist-pull: error: {exc}", file=sys.stderr)
        return 1
    from export.promote import next_steps

    print(next_steps(args.repository, pulled.name, pulled.version, promoted=args.promote))
    return 0


if __name__ == "__main__":
    sys.exit(main())
