# The README's two promises: `make run` starts a local stack, `make test` passes, on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install redis-server run test test-fast bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# Tests start their own redis-server on free ports; install the binary when the machine lacks it.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server with apt-get"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server; }

run: install
	$(BIN)/gravity demo

test: install redis-server
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/pytest -q -x tests/unit

lint: install
	$(BIN)/ruff check gateway routing policies simulator tests loadtests
	$(BIN)/mypy gateway routing policies simulator

clean:
	rm -rf $(VENV) .gravity .pytest_cache
