# `make up`: set up and run the local stack (examples/local/cluster.yaml) until Ctrl-C.
# `make test`: set up (venv, Python and Debian packages) and run the test suite.
VENV ?= .venv
PYTHON ?= python3
SPEC ?= examples/local/cluster.yaml
# Extras of pyproject.toml the test suite needs (each issue's tools come in their own extra).
TEST_EXTRAS ?= test,bench,infra,provision,models,llm

.PHONY: up test lint system-deps clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The serving stack only: what `make up` needs.
$(VENV)/.stamp-core: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e .
	touch $@

# The gateway's request path compiled to C extensions with mypyc where a C compiler is (about half the CPU per
# request; scripts/compile-gateway), rebuilt when the gateway's sources change. Without one, the .py files run.
$(VENV)/.stamp-compiled: $(wildcard controlplane/gateway/*.py) scripts/compile-gateway | $(VENV)/.stamp-core
	if command -v cc >/dev/null; then \
		$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[compiled]' && \
		$(VENV)/bin/python scripts/compile-gateway; \
	else \
		echo "no C compiler: the gateway runs from its .py sources"; $(VENV)/bin/python scripts/compile-gateway --clean; \
	fi
	touch $@

# Everything the tests use.
$(VENV)/.stamp-test: pyproject.toml | $(VENV)/bin/python $(VENV)/.stamp-compiled
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[$(TEST_EXTRAS)]'
	touch $@ $(VENV)/.stamp-core

system-deps:
	./scripts/system-deps

up: $(VENV)/.stamp-core $(VENV)/.stamp-compiled
	$(VENV)/bin/cpctl up -f $(SPEC)

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check controlplane tests examples bench infra

test: system-deps $(VENV)/.stamp-test lint
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build controlplane/gateway/*.so
