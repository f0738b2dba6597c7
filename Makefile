# Two entry points for a newcomer:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ds-cl-installed

.PHONY: setup demo test clean

setup: $(STAMP)

# CPU torch first where there is no CUDA: an unpinned `torch` (asked for by deepspeed's build)
# would pull gigabytes of CUDA wheels. deepspeed ships only an sdist whose setup.py imports
# torch, so it is built against the torch we installed (--no-build-isolation).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	    $(PIP) install -q torch; \
	else \
	    $(PIP) install -q torch==2.13.0 || \
	    $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -q --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q -e '.[test]'
	touch $@

demo: setup
	DS_ACCELERATOR=cpu $(VENV)/bin/ds-cl demo

test: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
