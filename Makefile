# The project's entry points. `make test` and `make demo` work on a fresh machine: both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/ci-constraints.txt
STAMP := $(VENV)/.installed
OUT ?= outputs

export OMP_NUM_THREADS ?= 1

.PHONY: help install test demo clean

help:
	@echo "make install  create $(VENV) and install megatron_sapo with the pinned CI versions"
	@echo "make demo     the main job (until the trainer lands: the loss library's Figure 1 and gate table)"
	@echo "make test     install, then run the test suite"

$(STAMP): setup.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(VENV)/bin/megatron-sapo info
	$(PY) tools/plot_sapo_gate.py --out $(OUT)/sapo_gate.png

clean:
	rm -rf $(VENV) build *.egg-info $(OUT)
