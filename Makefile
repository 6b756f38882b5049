# Two entry points for a new user; each creates .venv on first use.
#   make demo   the pipeline on the built-in synthetic corpus, tiny config, CPU
#   make test   the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean-demo

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python demo.py

test: venv
	$(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf data_cache/synthetic_* experiments/*_demo
