# syntax=docker/dockerfile:1
#
# CPU image of the MNIST ONNX inference service (onnxruntime, no TensorFlow).
#
#   docker build -t mnist-serving:cpu .
#   docker run --rm --read-only -p 8000:8000 mnist-serving:cpu
#
# Layers of the final image, from the most to the least stable: OS + non-root user,
# the dependency virtualenv (/opt/venv), the default model (/app/models), the
# service code (one small wheel). A code change rebuilds only the last layer.
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret
# (`--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt`): it is used by pip
# during the build and never stored in a layer. See docs/deployment.md.

# Any Debian-based image with a python3 (3.11+) that has the venv module works:
# python:3.11-slim-bookworm, or a local Debian image with python3.11 + python3-venv.
ARG BASE_IMAGE=python:3.11-slim-bookworm
# checkov:skip=CKV_DOCKER_7: FROM ${BASE_IMAGE} is the pinned tag above; checkov does not expand the ARG

# ---------------------------------------------------------------------------
# deps: the third-party dependencies, from pyproject.toml only.
FROM ${BASE_IMAGE} AS deps
ARG ORT_EXTRA=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_INPUT=1 \
    PIP_CACHE_DIR=/var/cache/mnist-pip
WORKDIR /src
COPY deploy/pyproject_requirements.py pyproject.toml ./
# /opt/venv is what the image ships: the dependencies only, not even pip. The tools
# (pip, setuptools) live in /opt/buildenv, which never reaches the final image.
RUN --mount=type=secret,id=ca \
    --mount=type=cache,id=mnist-pip-cache,target=/var/cache/mnist-pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python3 pyproject_requirements.py pyproject.toml "${ORT_EXTRA}" > requirements.txt \
    && python3 -m venv /opt/buildenv \
    && /opt/buildenv/bin/pip install "pip>=23" "setuptools>=69" "wheel" \
    && python3 -m venv --without-pip /opt/venv \
    && /opt/buildenv/bin/pip --python /opt/venv/bin/python install --requirement requirements.txt

# ---------------------------------------------------------------------------
# wheel: the project itself, built offline from the copied sources.
FROM deps AS wheel
COPY README.md ./
COPY service/ ./service/
RUN /opt/buildenv/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# ---------------------------------------------------------------------------
# runtime
FROM ${BASE_IMAGE} AS runtime
ARG APP_UID=10001
LABEL org.opencontainers.image.title="mnist-serving" \
      org.opencontainers.image.description="ONNX Runtime inference service for an MNIST digit classifier (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric, non-root user with a passwd entry (some libraries look the user up).
RUN groupadd --system --gid "${APP_UID}" mnist \
    && useradd --system --uid "${APP_UID}" --gid "${APP_UID}" --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin mnist

COPY --from=deps /opt/venv /opt/venv

# ORT_DISABLE_TELEMETRY: onnxruntime >= 1.2x on Linux sends 1DS telemetry and tries to
# persist a device id (which warns on a read-only filesystem); 1.32 honours this name,
# some releases read ORT_TELEMETRY_DISABLED instead, so both are set.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    ORT_TELEMETRY_DISABLED=1 \
    MNIST_HOST=0.0.0.0 \
    MNIST_PORT=8000 \
    MNIST_MODEL_REPOSITORY=/app/models

WORKDIR /app
# The default model; mount a model repository at /app/models to replace it.
COPY models/ /app/models/
COPY deploy/healthcheck.py /app/healthcheck.py

# The service code, last: installed from the wheel without touching the deps, with
# the build stage's pip mounted for this step only.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    --mount=type=bind,from=deps,source=/opt/buildenv,target=/opt/buildenv \
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    /opt/buildenv/bin/pip --python /opt/venv/bin/python install \
        --no-deps --no-index --no-cache-dir /tmp/wheels/*.whl

USER ${APP_UID}:${APP_UID}
# 8000: HTTP (REST, Open Inference Protocol, metrics); 8001: gRPC when MNIST_GRPC_PORT=8001 (off by default)
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/venv/bin/python", "/app/healthcheck.py"]
STOPSIGNAL SIGTERM
# Exec form: mnist-serve is PID 1 and receives SIGTERM itself, then drains.
ENTRYPOINT ["/opt/venv/bin/mnist-serve"]
