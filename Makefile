# fedhpc developer entry points. Every target creates/reuses .venv.
#   make test    install everything the tests need, then lint, type-check and run the tests
#   make protos  regenerate services/fedhpc/api/v1 from protos/fedhpc/v1
#   make demo    the local federation (see README)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# The CPU wheel; an unpinned torch pulls several GB of CUDA packages.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.fedhpc-installed
PYTEST_ARGS ?=

.PHONY: install system-deps test lint typecheck check-protos protos demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml setup.py services/fedhpc/aggregator/_kernels.c | $(PY)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# promtool/prometheus come from Debian (needs root, as in CI).
system-deps:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing prometheus (Debian package)"; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

check-protos: $(STAMP)
	$(PY) scripts/gen_protos.py --check

lint: $(STAMP)
	$(VENV)/bin/ruff check services tests benchmarks scripts
	$(VENV)/bin/ruff format --check services tests benchmarks scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# pytest exits 5 when it collects no test; make fails on it like on any other failure.
test: $(STAMP) system-deps check-protos lint typecheck
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pytest $(wildcard tests/unit tests/integration tests/e2e tests/deploy) $(PYTEST_ARGS)

bench: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/transfer.py --size-mb 256

demo: $(STAMP)
	$(VENV)/bin/fedhpc demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
