# Fresh-machine entry points. `make test` creates .venv if missing, installs, runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# ComfyUI needs torchvision, which exists only for the PyPI builds of torch (CPU works fine).
TORCH ?= torch torchvision
# A real ComfyUI for the node tests; point COMFYUI_DIR at your own to use it instead.
COMFYUI_DIR ?= $(CURDIR)/.cache/comfyui
export COMFYUI_DIR
# The browser tests drive Debian's Chromium (apt needs root; sudo is used when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install chromium lint test demo bench evidence clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml tools/get_comfyui.py | $(PY)
	$(PY) -c "import torchvision" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test,bench,log,lowmem]"
	$(PY) -m tools.get_comfyui "$(COMFYUI_DIR)"
	touch $@

install: $(VENV)/.installed

# The demo needs only the library (no ComfyUI, no browser): any torch build will do.
$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) -m sara_train.demo --out demo-output

chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install chromium lint
	$(PY) -m pytest -q

bench: install
	$(PY) -m benchmarks.memory_speed

evidence: install  # docs/results.md: SaRA vs LoRA and the ablations (~150 min on 2 cores; resumable)
	$(PY) -m benchmarks.quality --out bench-output/quality

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info .cache demo-output
