# The two set-up commands of the README: `make demo` (install, then run the main job) and
# `make test` (install, then run the tests). Both create ./.venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint install

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"mav_jax needs Python 3.11, this is {sys.version.split()[0]}: run make PYTHON=python3.11"'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m mav_jax.sample --prompt "a red circle moving left" --output outputs/demo.gif --overwrite

$(TEST_STAMP): $(STAMP) requirements-test.txt requirements-ref.txt
	$(VENV)/bin/pip install --quiet -r requirements-test.txt
	# Reference implementations for parity tests and benchmarks, outside the venv (see the file).
	$(VENV)/bin/pip install --quiet --no-deps --target .ref_pkgs --upgrade -r requirements-ref.txt
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(VENV)/bin/python -m pytest

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
