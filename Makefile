# Two entry points for a fresh machine (README.md): `make demo` and `make test`.
# Each builds the virtual environment ($(VENV)) on first use: torch==2.13.0 (a CPU wheel on this project's
# machines), or -- where python3 already has a CUDA torch -- a venv over the system site-packages so that
# torch is reused instead of downloaded again; then the dev requirements and lorakern itself, built with
# --no-build-isolation so the extension compiles against that torch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.lorakern-installed
SOURCES := setup.py requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.h csrc/cuda/*.cpp)

.PHONY: demo test venv bench papers clean

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest tests

papers: $(STAMP)
	$(PY) examples/papers/run_all.py

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

venv: $(STAMP)

$(STAMP): $(SOURCES)
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  echo "lorakern: reusing this machine's CUDA torch (--system-site-packages)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(PIP) install --progress-bar off torch==2.13.0; \
	fi
	$(PIP) install --progress-bar off -r requirements-dev.txt
	$(PIP) install --progress-bar off --no-build-isolation -e .
	@touch $(STAMP)

clean:
	rm -rf build lorakern/_C*.so *.egg-info
