# Set-up and entry points. `make setup` creates .venv with torch==2.13.0 installed first
# (the CPU wheel on a machine without CUDA; set TORCH_SPEC to use your own build), then the project,
# and Debian's chromium + chromium-driver for the browser test (tests/test_mlflow_ui.py) when they are
# missing and this runs as root with apt-get; otherwise it prints a note and that test skips.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup browser test test-fast lint clean demo demo-stop

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel
	$(PY) -m pip install "$(TORCH_SPEC)"

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed browser

browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "note: chromium and chromedriver not found and not installable here (needs root and apt-get);" \
			"tests/test_mlflow_ui.py will skip. Install Debian's chromium and chromium-driver to run it."; \
	fi

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests

test-fast: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

# End-to-end demo on this machine (Ray cluster, preprocessing, training, evaluation, Serve, MLflow UI);
# outputs in outputs/demo/. `make demo-stop` stops the cluster and the MLflow server it started.
demo: setup
	bash scripts/demo.sh

demo-stop:
	bash scripts/demo_stop.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
