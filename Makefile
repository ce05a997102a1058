# The two commands the README starts with: `make demo` and `make test`.
# Each creates the virtual environment on first use (pinned by constraints.txt), so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test test-fast lint format install tiny corpus config-help clean

demo: $(STAMP)
	$(PY) -m higgs_lora.demo --config configs/demo.yaml output_dir=$(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not slurm"

# Style and layers: ruff (lint + format check) and the import-linter contracts of pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

install: $(STAMP)

# Re-installs when the pins or the package metadata change. pip is pinned too, so resolution is repeatable.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check pip==26.3
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[serve,eval,dev,arabic]"
	touch $(STAMP)

tiny: $(STAMP)
	$(PY) -m higgs_lora.tiny --out build/tiny

# Regenerates the committed demo corpus (needs `apt-get install espeak-ng`).
corpus: $(STAMP)
	$(PY) examples/make_demo_corpus.py --out examples/demo_corpus

config-help: $(STAMP)
	$(PY) -m higgs_lora.config --help-keys

clean:
	rm -rf build runs .pytest_cache
