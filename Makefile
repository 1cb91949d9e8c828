# fewstep_lab: common commands. `make help` lists them.
#
#   make course     run every notebook headless (default profile), outputs under runs/
#   make test       the test suite plus the notebooks, in the smoke profile (what CI runs)
#   make notebooks  re-execute the notebooks in place in the cpu profile (to commit outputs)
#   make student    the student edition (solutions replaced by stubs) in runs/student/
#   make slides     a reveal.js deck per notebook in runs/slides/
#   make lab        start JupyterLab
#
# Variables: PYTHON (interpreter that creates the venv), VENV (the environment to use;
# `make test VENV=$$CONDA_PREFIX` uses an active conda env), PROFILE (for `make course`),
# PYTEST_ARGS (extra pytest arguments, e.g. PYTEST_ARGS="-k sampling"), TORCH (a PyTorch build
# to install first from PyTorch's own index: TORCH=cpu, or a CUDA tag such as TORCH=cu128;
# TORCH_INDEX overrides the index URL).

PYTHON ?= python3
VENV ?= .venv
PROFILE ?=
PYTEST_ARGS ?=
TORCH ?=
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH)
# The torch version pyproject.toml pins (one source of truth).
TORCH_VERSION := $(shell sed -n 's/.*"torch==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
TORCH_STAMP := $(if $(TORCH),$(VENV)/.fewstep-torch-$(TORCH))

PY := $(VENV)/bin/python
# Notebooks are tested by nbval; the folder may not exist yet in a fresh clone.
TEST_PATHS := tests $(wildcard notebooks)

.DEFAULT_GOAL := help
.PHONY: help install install-dev install-lab course test notebooks student slides lab clean-install

help:
	@echo "make course     install, then run every notebook headless (PROFILE=smoke|cpu|gpu to choose)"
	@echo "make test       install [dev], then run tests and notebooks in the smoke profile"
	@echo "make notebooks  install, then execute notebooks in place in the cpu profile"
	@echo "make student    install, then write the student edition (exercises stubbed) to runs/student/"
	@echo "make slides     install [dev], then write a reveal.js deck per notebook to runs/slides/"
	@echo "make lab        install [lab], then start JupyterLab"
	@echo "  TORCH=cpu      first install the CPU-only torch build (Linux: avoids PyPI's CUDA wheel of several GB)"
	@echo "venv: $(VENV) (created with $(PYTHON) if missing)"

# The environment itself: created once, never recreated.
$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamp files make installing idempotent and instant when nothing changed; they are
# redone when pyproject.toml changes. Editable installs pick up code changes by themselves.
# With TORCH=..., torch comes first from PyTorch's index; pip then keeps it (the version matches the pin).
$(VENV)/.fewstep-torch-%: | $(PY)
	$(PY) -m pip install "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX)
	@touch $@

$(VENV)/.fewstep-installed: pyproject.toml | $(PY) $(TORCH_STAMP)
	$(PY) -m pip install -e .
	@touch $@

$(VENV)/.fewstep-installed-dev: pyproject.toml | $(PY) $(TORCH_STAMP)
	$(PY) -m pip install -e ".[dev]"
	@touch $@ $(VENV)/.fewstep-installed

$(VENV)/.fewstep-installed-lab: pyproject.toml | $(PY) $(TORCH_STAMP)
	$(PY) -m pip install -e ".[lab]"
	@touch $@ $(VENV)/.fewstep-installed

install: $(VENV)/.fewstep-installed
install-dev: $(VENV)/.fewstep-installed-dev
install-lab: $(VENV)/.fewstep-installed-lab

course: install
	$(if $(PROFILE),FEWSTEP_PROFILE=$(PROFILE) )$(VENV)/bin/fewstep course

# One torch thread per pytest worker: two workers with two threads each on two cores made runs
# up to 15x slower (thread oversubscription), measured here.
test: install-dev
	FEWSTEP_PROFILE=smoke OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadscope --nbval-lax --nbval-current-env $(TEST_PATHS) $(PYTEST_ARGS)

notebooks: install
	$(VENV)/bin/fewstep course --profile cpu --inplace --out runs/notebooks

# The notebooks stay the instructor edition; this writes copies whose "### BEGIN SOLUTION" blocks are stubs.
student: install
	$(VENV)/bin/fewstep course --student runs/student

# nbconvert (the slides exporter) comes with the dev extra; the decks load reveal.js from a CDN.
slides: install-dev
	$(VENV)/bin/fewstep course --slides runs/slides

lab: install-lab
	$(VENV)/bin/jupyter lab

# Forget the install stamps (the next target reinstalls); the venv itself stays.
clean-install:
	rm -f $(VENV)/.fewstep-installed $(VENV)/.fewstep-installed-dev $(VENV)/.fewstep-installed-lab $(VENV)/.fewstep-torch-*
