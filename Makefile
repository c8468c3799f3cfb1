# The two commands a new user runs (see README.md):
#   make demo   -> sets up .venv and runs the main job (dense vs RAS on the shipped DiT)
#   make test   -> sets up .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rasfx-installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,docs,demo]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -n 2 --dist loadfile

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) outputs
