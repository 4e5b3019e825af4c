# capsnet: `make train` and `make test` are all a new user needs (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Tests, CI and benchmarks read the offline datasets beside the project when present.
SHARED_DATA ?= $(abspath ../shared/data)
TEST_ENV := $(if $(wildcard $(SHARED_DATA)),CAPSNET_SHARED_DATA=$(SHARED_DATA))
ARGS ?=

.PHONY: setup train test test-all bench report tb clean

setup: $(STAMP)  ## create .venv and install capsnet with its dependencies (idempotent)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import capsnet, torch, hydra"
	touch $(STAMP)

train: setup  ## the paper's MNIST CapsNet, 3 routing iterations (ARGS='key=value ...' adds overrides)
	$(PY) train.py model=capsnet dataset=mnist routing.iters=3 $(ARGS)

test: setup  ## the fast test suite (about 4 minutes on 2 CPU cores)
	$(TEST_ENV) $(PY) -m pytest -m "not slow" $(ARGS)

test-all: setup  ## every test, the slow end-to-end ones included
	$(TEST_ENV) $(PY) -m pytest $(ARGS)

bench: setup  ## speed and memory table of a CapsNet step (writes bench.json)
	$(PY) -m capsnet.tools.bench $(ARGS)

report: setup  ## summarise a sweep: make report DIR=outputs/multirun/<date>/<time>
	$(PY) -m capsnet.tools.report $(DIR)

tb: setup  ## TensorBoard over every run
	$(VENV)/bin/tensorboard --logdir outputs

clean:  ## remove caches and build leftovers (never outputs/)
	rm -rf .pytest_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
