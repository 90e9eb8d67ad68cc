"""Fill in deploy/cloudrun-service.yaml for one project, region and image digest; print the result.

    python3 deploy/cloudrun_render.py --project my-project --region europe-west4 \\
        --image europe-west4-docker.pkg.dev/my-project/mnist/mnist-serving@sha256:<64 hex> > cloudrun.yaml
    gcloud run services replace cloudrun.yaml --region europe-west4

The template carries three placeholders: PROJECT_ID (metadata.namespace and the service account's
project), REGION (the location label) and IMAGE. The image must be pinned by digest: a tag could point
at another image by the time Cloud Run pulls it. Standard library only, so CI runs it with any python3.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().with_name("cloudrun-service.yaml")
_DIGEST_REF = re.compile(r"^[a-z0-9][a-z0-9.-]*(:[0-9]+)?(/[a-z0-9._-]+)+@sha256:[0-9a-f]{64}$")
_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")  # Google Cloud project ID rules
_REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")
# Whole-word placeholders, so that "mnist-serving" or a comment never matches.
_PLACEHOLDERS = {
    "IMAGE": re.compile(r"(?<=image: )IMAGE$", re.MULTILINE),
    "PROJECT_ID": re.compile(r"\bPROJECT_ID\b"),
    "REGION": re.compile(r"(?<=cloud.googleapis.com/location: )REGION$", re.MULTILINE),
}


def render(template: str, *, image: str, project: str, region: str) -> str:
    if not _DIGEST_REF.match(image):
        raise ValueError(f"image must be NAME@sha256:<64 hex>, got {image!r}")
    if not _PROJECT.match(project):
        raise ValueError(f"not a Google Cloud project ID: {project!r}")
    if not _REGION.match(region):
        raise ValueError(f"not a Cloud Run region: {region!r}")
    out = template
    for name, value in (("IMAGE", image), ("PROJECT_ID", project), ("REGION", region)):
        out, count = _PLACEHOLDERS[name].subn(value, out)
        if count == 0:
            raise ValueError(f"placeholder {name} not found in the template")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="REGISTRY/PATH@sha256:DIGEST")
    parser.add_argument("--project", required=True, help="Google Cloud project ID")
    parser.add_argument("--region", required=True, help="Cloud Run region, e.g. europe-west4")
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(render(args.template.read_text(), image=args.image, project=args.project, region=args.region))
    except ValueError as exc:
        print(f"cloudrun_render: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
