# Set-up and entry points. `make setup` creates .venv with torch==2.13.0 installed first
# (the CPU wheel on a machine without CUDA; set TORCH_SPEC to use your own build), then every other
# dependency at the exact versions and hashes of requirements.lock, then the project itself, and
# Debian's chromium + chromium-driver for the browser test (tests/test_mlflow_ui.py) when they are
# missing and this runs as root with apt-get; otherwise it prints a note and that test skips.
# `make lock` re-resolves requirements.lock from pyproject.toml's ranges (dependencies + the dev extra,
# torch and its CUDA packages left out: torch comes from TORCH_SPEC); it keeps the versions already
# locked unless `make lock LOCK_FLAGS=--upgrade`. pyproject.toml keeps ranges for installs elsewhere.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
LOCK := requirements.lock
UV_SPEC ?= uv==0.13.8
LOCK_FLAGS ?=

.PHONY: setup browser test test-fast lint lock clean demo demo-stop

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel
	$(PY) -m pip install "$(TORCH_SPEC)"

$(VENV)/.installed: $(LOCK) pyproject.toml | $(PY)
	$(PY) -m pip install --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --no-deps -e .
	$(PY) -m pip check
	touch $@

# torch resolves to nothing here ("never" marker), so neither it nor its CUDA wheels enter the lock.
lock: | $(PY)
	$(PY) -m pip install "$(UV_SPEC)"
	printf 'torch; sys_platform == "never"\n' > $(VENV)/lock-overrides.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --python $(PY) \
		--override $(VENV)/lock-overrides.txt --custom-compile-command "make lock" $(LOCK_FLAGS) -o $(LOCK)

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
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest tests

test-fast: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest tests -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mkdocs build --strict --quiet

# End-to-end demo on this machine (Ray cluster, preprocessing, training, evaluation, Serve, MLflow UI);
# outputs in outputs/demo/. `make demo-stop` stops the cluster and the MLflow server it started.
demo: setup
	bash scripts/demo.sh

demo-stop:
	bash scripts/demo_stop.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
