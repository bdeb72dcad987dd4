# syntax=docker/dockerfile:1
# heartbeat-gateway container image: build in one stage, run in a slim one.
#   docker build -t heartbeat-gateway .
#   cp config/gateway.example.yaml my-config/config.yaml   # then edit it
#   docker run --read-only --tmpfs /tmp -v "$PWD/my-config:/etc/heartbeat-gateway:ro" \
#     -e PROD_ENVIRONMENT_KEY -e ANTHROPIC_API_KEY -e WORKER_TOKEN -p 8080:8080 -p 9090:9090 heartbeat-gateway
# Where no registry is reachable, `make image` (scripts/build-image) builds a stand-in base from Debian's
# packages and passes it as BASE_IMAGE, with PIP_ARGS pointing pip at a wheelhouse built on the host.

ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS build
# So `make image` can drop this stage's image once the final one is built (podman keeps it, untagged).
LABEL heartbeat-gateway.stage=build
ARG PIP_ARGS=""
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Everything the package needs, and nothing else (.dockerignore keeps tests, .venv and secrets out).
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# Wheels only for the dependencies (slim has no compiler); the package itself is pure Python.
# With OpenTelemetry (the otel extra), so the chart's `tracing.enabled` needs no other image.
# Bytecode is compiled here, because the read-only root filesystem cannot cache it at run time.
RUN python -m venv /opt/heartbeat-gateway \
 && /opt/heartbeat-gateway/bin/pip install $PIP_ARGS --only-binary=aiohttp,httptools,uvloop,multidict,yarl,frozenlist,propcache,pyyaml,protobuf ".[speed,otel]" \
 && /opt/heartbeat-gateway/bin/pip uninstall --yes pip setuptools \
 && python -m compileall -q /opt/heartbeat-gateway

FROM ${BASE_IMAGE}
# No compiler, no pip cache, no source tree: only the installed virtualenv.
COPY --from=build /opt/heartbeat-gateway /opt/heartbeat-gateway
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gateway
ENV PATH=/opt/heartbeat-gateway/bin:$PATH \
    # Nothing is written at run time (bytecode was compiled at build), so the root filesystem can be read-only.
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["heartbeat-gateway"]
CMD ["serve", "--config", "/etc/heartbeat-gateway/config.yaml"]
