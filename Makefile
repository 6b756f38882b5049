# Two entry points for a new user; each creates .venv on first use.
#   make demo   the pipeline on the built-in synthetic corpus, tiny config, CPU
#   make test   the test suite
# and, for contributors, `make lint`: ruff and the import-layer contracts (CI runs it before the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# circuit-tracer without its dependencies, apart from the environment: the tests validate the graph JSON
# with its pydantic models and render a graph with its viewer's files
CIRCUIT_TRACER := $(VENV)/circuit-tracer
# the scripts its viewer loads from public CDNs, from the npm registry instead (the tests run offline):
# tests/viewer/ holds their versions and the d3 + d3-jetpack bundle's entry
VIEWER_JS := $(VENV)/viewer-js

.PHONY: demo test lint venv clean-demo

# requirements*.txt pin the versions; the project itself is then installed in editable mode, without
# dependencies, so `import experiment` works from anywhere (tests need no sys.path edits).
$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml Makefile tests/viewer/package.json tests/viewer/d3-with-jetpack.js
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target $(CIRCUIT_TRACER) circuit-tracer==0.5.0
	mkdir -p $(VIEWER_JS) && cp tests/viewer/package.json tests/viewer/d3-with-jetpack.js $(VIEWER_JS)/
	cd $(VIEWER_JS) && npm install --silent --no-audit --no-fund \
	  && node_modules/.bin/esbuild d3-with-jetpack.js --bundle --minify --log-level=warning --outfile=d3-with-jetpack.min.js
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python demo.py

test: venv
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean-demo:
	rm -rf data_cache/synthetic_* experiments/*_demo
