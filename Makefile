# The two commands of the README. Both create (or update) .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-data
PYTEST_ARGS ?=

.PHONY: demo test venv lint clean

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

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check hamengine engine loaders models bench tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
