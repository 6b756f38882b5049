# Two entry points for a new user; each creates .venv on first use.
#   make demo   the pipeline on the built-in synthetic corpus, tiny config, CPU
#   make test   the test suite
# and, for contributors, `make test-fast` (the suite without the tests marked slow, about a minute) and
# `make lint`: ruff, the import-layer contracts and the type checker (CI runs it before the tests).
# The Python version: pyproject.toml's requires-python (">=3.11") is the only place it is stated. .venv is
# created with python3.11 (that version read from there) where there is one, else python3, or with
# `make PY=/path/to/python`; an older one stops the install with one line.
PY_MIN := $(shell sed -n 's/^requires-python *= *"[^0-9]*\([0-9][0-9.]*\).*/\1/p' pyproject.toml)
PY ?= $(firstword $(shell command -v python$(PY_MIN) python3 2>/dev/null) python3)
VENV := .venv
BIN := $(VENV)/bin
# circuit-tracer without its dependencies, apart from the environment: the tests validate the graph JSON
# with its pydantic models and render a graph with its viewer's files; with the versions it pins of the
# three packages its transcoder loaders need (the project's are newer), for a subprocess that puts this
# folder first on its path and loads the exported transcoders with circuit-tracer's own code
CIRCUIT_TRACER := $(VENV)/circuit-tracer
CIRCUIT_TRACER_PINS := circuit-tracer==0.5.0 huggingface-hub==0.36.2 transformers==4.57.3 tokenizers==0.22.1
# delphi (EleutherAI) for its latent-cache loader and score analysis: the package and what those import
# (plotly: the analysis module's), without its GPU dependencies (vllm, bitsandbytes), in a folder a test
# subprocess puts on its path
DELPHI := $(VENV)/delphi
DELPHI_PINS := eai-delphi==0.1.3 faiss-cpu==1.15.1 sentence-transformers==6.2.0 asyncer==0.0.18 sniffio==1.3.1 \
  jaxtyping==0.3.11 wadler-lindig==0.1.8 blobfile==3.3.0 lxml==6.1.3 orjson==3.13.0 simple-parsing==0.1.9 \
  docstring-parser==0.18.0 scipy==1.17.1 scikit-learn==1.9.1 joblib==1.6.0 threadpoolctl==3.8.0 \
  cloudpickle==3.1.3 narwhals==2.29.0 plotly==7.1.0
# SAELens for its SAE.load_from_disk: the package and what `import sae_lens` needs beyond the project's packages
# (transformer-lens, and wandb, which its config module imports), in a folder a test subprocess puts on its path
SAELENS := $(VENV)/saelens
SAELENS_PINS := sae-lens==6.54.12 transformer-lens==3.9.0 better-abc==0.0.3 jaxtyping==0.3.11 wandb==0.31.0 \
  platformdirs==4.14.8 protobuf==7.36.2 opentelemetry-api==1.45.2
# the scripts its viewer loads from public CDNs, from the npm registry instead (the tests run offline):
# tests/viewer/ holds their versions and the d3 + d3-jetpack bundle's entry
VIEWER_JS := $(VENV)/viewer-js

.PHONY: demo test test-fast lint venv clean-demo

# requirements*.txt pin the versions; the project itself is then installed in editable mode, without
# dependencies, so `import experiment` works from anywhere (tests need no sys.path edits).
# `make demo` needs only the runtime (.runtime); `make test` and `make lint` add the development tools,
# circuit-tracer's, delphi's and SAELens's side folders and the viewer bundle (.installed, which needs Node.js).
$(BIN)/.runtime: requirements.txt pyproject.toml Makefile
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: no $(PY) on PATH; this project needs Python $(PY_MIN) or" \
	  "newer (requires-python in pyproject.toml): install python$(PY_MIN), or run make PY=/path/to/python3.x" >&2; exit 1; }
	@$(PY) -c 'import sys; sys.version_info >= tuple(map(int, "$(PY_MIN)".split("."))) or sys.exit( \
	  "error: $(PY) is Python %d.%d; this project needs Python $(PY_MIN) or newer (requires-python in " \
	  "pyproject.toml): install python$(PY_MIN), or run make PY=/path/to/python3.x" % sys.version_info[:2])'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

$(BIN)/.installed: $(BIN)/.runtime requirements-dev.txt tests/viewer/package.json tests/viewer/d3-with-jetpack.js
	@command -v npm >/dev/null 2>&1 || { echo "error: make test and make lint need Node.js and npm (to bundle the" \
	  "viewer scripts the tests render offline), and npm is not on PATH: install them (Debian: apt-get install" \
	  "nodejs npm); make demo does not need them" >&2; exit 1; }
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target $(CIRCUIT_TRACER) $(CIRCUIT_TRACER_PINS)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target $(DELPHI) $(DELPHI_PINS)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target $(SAELENS) $(SAELENS_PINS)
	mkdir -p $(VIEWER_JS) && cp tests/viewer/package.json tests/viewer/d3-with-jetpack.js $(VIEWER_JS)/
	cd $(VIEWER_JS) && npm install --silent --no-audit --no-fund \
	  && node_modules/.bin/esbuild d3-with-jetpack.js --bundle --minify --log-level=warning --outfile=d3-with-jetpack.min.js
	touch $@

venv: $(BIN)/.installed

demo: $(BIN)/.runtime
	$(BIN)/python demo.py

test: venv
	$(BIN)/python -m pytest -q tests

# the tests not marked slow (pyproject.toml's pytest markers; tests/conftest.py marks every test that uses a
# trained session run): about a minute on 2 cores
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

clean-demo:
	rm -rf data_cache/synthetic_* experiments/*_demo
