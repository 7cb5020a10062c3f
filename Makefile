# Fresh-machine entry points. `make test` creates .venv if missing, installs, runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch is enough for the tests; override with e.g. TORCH=torch for the newest.
TORCH ?= torch==2.13.0

.PHONY: install test bench clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/memory_speed.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
