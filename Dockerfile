# syntax=docker/dockerfile:1
# flespi-mirror image: the `flespi-mirror` console script on a slim Python 3.11, as UID 10001.
#
#   docker build -t flespi-mirror .
#   docker run --rm -e FLESPI_TOKEN=... -e MIRROR_DATABASE_URL=postgresql://... -p 9465:9465 flespi-mirror
#
# Two stages: "build" turns the project and its dependencies into wheels; "runtime" installs
# those wheels only, from the local directory, so the final image has no compiler, no build
# backend and no source tree. The Helm chart in helm/flespi-mirror runs this image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is made of (see .dockerignore): metadata, the package, the migrations.
COPY pyproject.toml README.md ./
COPY mirror ./mirror
COPY migrations ./migrations

# Every dependency ships a binary wheel for CPython 3.11 on linux/amd64 and linux/arm64; should
# one ever need compiling, install its build tools here, never in the runtime stage.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip wheel --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MIRROR_METRICS_HOST=0.0.0.0 \
    MIRROR_METRICS_PORT=9465

# A numeric, non-root user, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 mirror \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin mirror

# Install from the build stage's wheels only (no index): the wheels never become a layer.
# pip compiles the bytecode now, so the read-only root filesystem costs nothing at start-up.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels flespi-mirror \
 && flespi-mirror --help > /dev/null

LABEL org.opencontainers.image.title="flespi-mirror" \
      org.opencontainers.image.description="Live PostgreSQL mirror of a flespi account over MQTT 5" \
      org.opencontainers.image.licenses="MIT"

USER 10001:10001
WORKDIR /tmp

# /metrics (Prometheus), /healthz (liveness), /readyz (readiness).
EXPOSE 9465

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MIRROR_METRICS_PORT', '9465'), timeout=4)"]

# The daemon handles SIGTERM itself: it drains, commits, acknowledges and disconnects.
ENTRYPOINT ["flespi-mirror"]
CMD ["run"]
