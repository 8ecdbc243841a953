# Two commands set everything up on a fresh machine (Python 3.11, x86_64):
#   make demo   - install into .venv, fetch Fashion-MNIST, run the main job (a real distillation run)
#   make test   - install into .venv, fetch Fashion-MNIST, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KDRAY := $(VENV)/bin/kdray

.PHONY: install data demo test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

data: install
	$(KDRAY) data fashion_mnist --root data

demo: data
	$(KDRAY) train configs/demo.yaml --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: data
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
