"""Print the runtime requirements declared in pyproject.toml, one per line.

Used by the Dockerfiles to install the dependencies in their own layer, before the
code is copied, so that a code change does not reinstall them:

    python3 pyproject_requirements.py pyproject.toml cpu > requirements.txt

The first argument is the pyproject.toml path; the others are extras whose
requirements are added to the base `project.dependencies`.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject_path: str, extras: list[str]) -> list[str]:
    with open(pyproject_path, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; known: {sorted(optional)}")
        reqs.extend(optional[extra])
    return reqs


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        raise SystemExit("usage: pyproject_requirements.py PYPROJECT [EXTRA ...]")
    for line in requirements(argv[0], argv[1:]):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
