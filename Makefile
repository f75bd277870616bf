# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on local disk; an unpinned torch would pull a CUDA build.
# Where pip's index holds only the CUDA build (PyPI on Linux), give PyPI's CPU index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH := torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,ray,onnx]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/tidal demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# fbgemm's CPU table-batched embedding is an optional peer, never a dependency
bench: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps fbgemm-gpu-cpu==1.8.0 || echo "fbgemm unavailable: benchmarking without it"
	$(BIN)/tidal bench sparse

# compiled kernels are cached next to the sources; clear them after editing Tidal's source
clean:
	find src -name '*.nb[ic]' -delete
	rm -rf $(VENV) .pytest_cache .hypothesis
