# Fresh-machine entry points. `make test` creates .venv if missing, installs, runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# ComfyUI needs torchvision, which exists only for the PyPI builds of torch (CPU works fine).
TORCH ?= torch torchvision
# A real ComfyUI for the node tests; point COMFYUI_DIR at your own to use it instead.
COMFYUI_DIR ?= $(CURDIR)/.cache/comfyui
export COMFYUI_DIR

.PHONY: install test bench clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml scripts/get_comfyui.py | $(PY)
	$(PY) -c "import torchvision" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test,bench]"
	$(PY) scripts/get_comfyui.py "$(COMFYUI_DIR)"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/memory_speed.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info .cache
