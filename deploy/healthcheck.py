"""Container health check: exit 0 when GET /healthz answers 200, else 1.

Slim images have no curl, so the Dockerfile HEALTHCHECK and the ECS task definition
run this with the image's own Python. It only uses the standard library.
"""

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("MNIST_PORT", "8000")
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "3"))) as resp:
            return 0 if resp.status == 200 else 1
    except Exception as exc:  # any failure means unhealthy
        print(f"healthcheck failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
