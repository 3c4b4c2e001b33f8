# One image for every Gravity service in docker-compose.yml: the gateway and the simulated backends.
#
#   docker build -t gravity:local .                      # installs from the package index
#   docker build --build-arg GRAVITY_WHEELS=.wheels .    # offline, from wheels built beforehand
#                                                        # (`pip wheel --wheel-dir .wheels .`)
# BASE_IMAGE is any Debian-like image with python3 (>= 3.11) and its venv module; the tests build
# one locally with debootstrap because no registry is reachable there (docs/compose.md).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
# Empty: install the project and its dependencies from the package index. A path inside the build
# context: install only from the wheels there (--no-index), so the build needs no network at all.
ARG GRAVITY_WHEELS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/gravity
COPY . /src
# xds-protos ships an older copy of opentelemetry-proto's modules at the same paths: put
# opentelemetry-proto's back (the OTLP exporter needs them), then check that the exporter imports.
RUN if [ -n "$GRAVITY_WHEELS" ]; then \
      pip_src="--no-index --find-links /src/$GRAVITY_WHEELS"; \
      /opt/gravity/bin/pip install $pip_src gravity-gateway; \
    else \
      pip_src=""; \
      /opt/gravity/bin/pip install /src; \
    fi \
 && otel_proto=$(/opt/gravity/bin/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))') \
 && /opt/gravity/bin/pip install $pip_src --no-deps --force-reinstall "opentelemetry-proto==$otel_proto" \
 && /opt/gravity/bin/python -c 'import opentelemetry.exporter.otlp.proto.http.trace_exporter' \
 && /opt/gravity/bin/gravity check-config /src/config/compose.yaml

FROM ${BASE_IMAGE}
# The venv is self-contained and BASE_IMAGE is the same in both stages, so it is copied as is: no
# pip, compiler or build context in the final image.
COPY --from=builder /opt/gravity /opt/gravity
# tiktoken would download its BPE files on first use; the project ships them in tiktoken's cache
# format, and the installed package no longer sits next to config/.
COPY config/tiktoken /usr/share/gravity/tiktoken
ENV PATH=/opt/gravity/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TIKTOKEN_CACHE_DIR=/usr/share/gravity/tiktoken \
    GRAVITY_HEALTH_URL=http://127.0.0.1:8080/health

# Non-root. The working directory is the only writable place (the embedded-Redis fallback writes
# .gravity/ there when no state.redis_url is configured).
RUN useradd --system --create-home --home-dir /var/lib/gravity --shell /usr/sbin/nologin gravity
WORKDIR /var/lib/gravity
USER gravity

EXPOSE 8080
# The gateway drains on SIGTERM (in-flight requests finish, then it exits 0); compose gives it
# stop_grace_period to do so before SIGKILL.
STOPSIGNAL SIGTERM
# GRAVITY_HEALTH_URL lets the simulator services reuse the check on their own port.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GRAVITY_HEALTH_URL'], timeout=2)"]
ENTRYPOINT ["gravity"]
CMD ["serve", "--config", "/etc/gravity/gravity.yaml"]
