"""Pin the `mnist-serving` image of a kustomize overlay to one digest, in place (what
`kustomize edit set image mnist-serving=NAME@sha256:...` does, without the kustomize binary).

    python3 deploy/kustomize_pin.py k8s/overlays/gke \\
        europe-west4-docker.pkg.dev/my-project/mnist/mnist-serving-gpu@sha256:<64 hex>
    kubectl apply -k k8s/overlays/gke

CI runs it in its checkout before `kubectl apply -k` (.github/workflows/ci.yml, deploy-gke); the committed
overlays keep a tag. The overlay's `images:` entry named `mnist-serving` gets `newName` and `digest`
(its `newTag`, if any, is dropped). Standard library only, so any python3 runs it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

IMAGE_NAME = "mnist-serving"
_DIGEST_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9.-]*(:[0-9]+)?(/[a-z0-9._-]+)+)@(?P<digest>sha256:[0-9a-f]{64})$")
# The `images:` entry for IMAGE_NAME: "  - name: mnist-serving" and its indented keys that follow.
_ENTRY = re.compile(
    rf"^(?P<indent>[ ]*)- name: {IMAGE_NAME}[ ]*\n(?P<body>(?:(?P=indent)[ ]{{2}}(?:newName|newTag|digest): .*\n)*)",
    re.MULTILINE,
)


def pin(kustomization: str, image_ref: str) -> str:
    ref = _DIGEST_REF.match(image_ref)
    if ref is None:
        raise ValueError(f"image must be NAME@sha256:<64 hex>, got {image_ref!r}")
    matches = list(_ENTRY.finditer(kustomization))
    if len(matches) != 1:
        raise ValueError(f"expected one images entry named {IMAGE_NAME!r}, found {len(matches)}")
    m = matches[0]
    pad = m["indent"] + "  "
    entry = f"{m['indent']}- name: {IMAGE_NAME}\n{pad}newName: {ref['name']}\n{pad}digest: {ref['digest']}\n"
    return kustomization[: m.start()] + entry + kustomization[m.end() :]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: kustomize_pin.py OVERLAY_DIR NAME@sha256:DIGEST", file=sys.stderr)
        return 2
    path = Path(argv[0]) / "kustomization.yaml"
    try:
        path.write_text(pin(path.read_text(), argv[1]))
    except (OSError, ValueError) as exc:
        print(f"kustomize_pin: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
