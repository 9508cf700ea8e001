# The two commands of the README (demo, test). Every target creates (or updates) .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-data
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-random venv lint clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Re-install when the package metadata changes (editable install: code changes need nothing).
$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/hamengine demo --workdir $(DEMO_DIR)

# Everything (GPU tests only with PYTEST_ARGS="-m gpu" on a CUDA host).
test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Without the tests marked slow (end-to-end trainings, subprocess runs): a few minutes on 2 cores.
test-fast: venv
	$(BIN)/python -m pytest -q -m "not gpu and not slow" $(PYTEST_ARGS)

# Everything in a random order (pytest-random-order): files in random order, tests shuffled within
# each file, so module fixtures are built once. The header prints the seed; PYTEST_ARGS=
# "--random-order-seed=N" repeats an order, "--random-order-bucket=global" mixes files as well.
test-random: venv
	$(BIN)/python -m pytest -q -p random_order --random-order $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check hamengine engine loaders models bench tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
