# `make up`: set up and run the local stack (examples/local/cluster.yaml) until Ctrl-C.
# `make test`: set up and run the test suite. Both create the virtual environment they need.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp
SPEC ?= examples/local/cluster.yaml

.PHONY: up test lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/cpctl up -f $(SPEC)

lint: $(STAMP)
	$(VENV)/bin/ruff check controlplane tests examples

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
