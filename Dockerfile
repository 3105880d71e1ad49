# syntax=docker/dockerfile:1
# tenantgate: fail-closed tenant isolation for PostgreSQL, as a container.
#
#   docker build -t tenantgate .
#   docker run --rm -p 6432:6432 -p 9187:9187 \
#       -v "$PWD/policy.yaml:/etc/tenantgate/policy.yaml:ro" \
#       -e APP_DB_PASSWORD=... tenantgate
#
# The policy must listen on 0.0.0.0 inside a container (listen.host and
# metrics.host); see deploy/kubernetes/configmap.yaml for one that does.

# --- build: install the package into a virtual environment ----------------------------
FROM python:3.12.7-slim-bookworm@sha256:032c52613401895aa3d418a4c563d2d05f993bc3ecc065c8f4e2280978acd249 AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# gcc: setup.py compiles the hot path with mypyc (the slim image has Python's headers).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy/ proxy/
RUN python -m venv /opt/tenantgate \
    && /opt/tenantgate/bin/pip install --no-cache-dir . \
    && /opt/tenantgate/bin/python -c "import sys, tenantgate; print(tenantgate.COMPILED_WHY); sys.exit(not tenantgate.COMPILED)" \
    && /opt/tenantgate/bin/pip uninstall --yes pip setuptools wheel \
    && find /opt/tenantgate -name '__pycache__' -prune -exec rm -rf {} +

# --- runtime: the virtual environment and an unprivileged user, nothing else ---------
FROM python:3.12.7-slim-bookworm@sha256:032c52613401895aa3d418a4c563d2d05f993bc3ecc065c8f4e2280978acd249
LABEL org.opencontainers.image.title="tenantgate" \
      org.opencontainers.image.description="Fail-closed tenant isolation proxy for PostgreSQL" \
      org.opencontainers.image.licenses="GPL-3.0-or-later"
ENV PATH=/opt/tenantgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 tenantgate \
    && useradd --system --uid 10001 --gid tenantgate --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin tenantgate \
    && mkdir -p /etc/tenantgate
COPY --from=build /opt/tenantgate /opt/tenantgate
COPY config/example.yaml /etc/tenantgate/example.yaml
USER 10001:10001
# 6432: PostgreSQL clients; 9187: /metrics, /healthz, /readyz
EXPOSE 6432 9187
STOPSIGNAL SIGTERM
# Slim images have no curl: ask Python. Assumes metrics.port 9187 (the default).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9187/healthz', timeout=2).status != 200)"]
CMD ["tenantgate", "serve", "--config", "/etc/tenantgate/policy.yaml"]
