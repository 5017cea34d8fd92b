# Two commands for a fresh machine:  `make run` (the local stack) and `make test` (the test suite).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test bench-extproc bench-envoy clean proto

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev,backends,bench,gateway]'
	touch $(STAMP)

run: setup
	$(BIN)/epp-stack up $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench-extproc: setup
	$(BIN)/extproc-loadgen $(ARGS)

bench-envoy: setup  # the EPP behind real Envoy vs Envoy routed straight to the same upstreams
	$(BIN)/envoy-loadgen $(ARGS)

proto: setup
	$(BIN)/python -m epp.admin.build_proto

clean:
	rm -rf $(VENV) build *.egg-info
