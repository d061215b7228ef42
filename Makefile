# One-command entry points. `make demo` and `make test` work on a fresh machine with
# only Python 3.11 and pip: they create .venv and install the project first.
#
# PyTorch: torch and torchvision come from the package registry as a matching pair
# (pyproject asks for torch>=2.14, so pip never picks a local CPU-only 2.13 wheel
# that registry torchvision cannot load against).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-extended bench clean

# Debian's chromium drives the web-page test (Playwright is only the client; never
# `playwright install`, which downloads browsers from outside the package registries).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi

# --no-cache-dir: torch's CUDA wheels are several GB; keeping a cached copy next to the
# installed one doubles the disk a fresh install needs (one CI run ran out of space).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --no-cache-dir -e ".[test]"
	$(BIN)/python -c "import torch, torchvision, compressai, open_clip, ray, mlflow; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python jobs/demo.py

test: setup $(CHROMIUM)
	$(BIN)/python -m pytest

test-extended: setup
	$(BIN)/python -m pytest -m extended

bench: setup
	$(BIN)/python benchmarks/codec_speed.py
	$(BIN)/python benchmarks/entropy_efficiency.py
	$(BIN)/python benchmarks/preprocess_throughput.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
