# potstill: `make demo` and `make test` work on a fresh machine (they create .venv first).
#
# torch is installed first, pinned to the CPU build on this machine's disk, so that no other
# requirement pulls a multi-GB CUDA build; the project then installs editable with its extras.
# A stamp file makes later runs skip the installs (it is redone when pyproject.toml changes).

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.potstill-installed
EXTRAS  := test,hf,quant,zoo,bench
TORCH   := torch==2.13.0
PYTEST_ARGS ?=

# Nothing may be fetched from a model hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint install clean

demo: $(STAMP)
	$(BIN)/potstill compile examples/digits_cnn.py:teacher --profile cpu --ratio 0.5 -o out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check compiler passes targets profiles
	$(BIN)/mypy compiler passes targets profiles

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The EfficientNet-Lite model code declares stale pins; it needs only torch (shared DATA.md), so --no-deps.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install --no-deps efficientnet-lite-pytorch
	touch $(STAMP)

clean:
	rm -rf out build dist .pytest_cache .mypy_cache .ruff_cache
