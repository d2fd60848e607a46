# The project's entry points. `make test` and `make demo` work on a fresh machine: both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/ci-constraints.txt
STAMP := $(VENV)/.installed
OUT ?= outputs

export OMP_NUM_THREADS ?= 1

include kernels/kernels.mk

SGLANG_VENV ?= .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.installed
# A real MLflow tracking server for the tests, in its own environment: the full mlflow needs pyarrow<26 (the
# trainer needs only the client, mlflow-skinny)
MLFLOW_VENV ?= .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed

# Slurm 22.05, munge and shellcheck from Debian 12 for tests/test_slurm.py: a real one-node cluster on this machine
# (tools/slurm_cluster.sh) runs the sbatch recipes. Installs as root (or through sudo) unless already there.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge shellcheck
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# The prepared GPU check (tools/gpu_check.sh). The lent GPU machines have no network and no megatron-core: its wheel
# (and psutil's, for dist_checkpointing) for their Python 3.12 on manylinux_2_28 x86-64, at the CI constraints'
# versions, travel with the repository (the carry list names this folder; 64 MiB at most)
GPU_WHEELS ?= outputs/gpu_wheels
GPU_CHECK_ARGS ?=

.PHONY: help install sglang-env mlflow-server-env slurm-env test test-faults test-slurm test-kernels-native kernels bench demo \
	paper-sweep gpu-wheels gpu-check clean

help:
	@echo "make install  create $(VENV) and install megatron_sapo with the pinned CI versions"
	@echo "make demo     the main job: SAPO RL of a tiny MoE on CPU (recipes/tiny_cpu.yaml), tracked in local MLflow"
	@echo "make test     install, build the host kernels, then run the test suite"
	@echo "make sglang-env  the SGLang server's own environment ($(SGLANG_VENV)), used by the rollout tests"
	@echo "make slurm-env   Slurm, munge and shellcheck from Debian (apt-get), used by the Slurm tests"
	@echo "make test-faults the fault-injection tests alone (also part of make test); the output ends with the fault table"
	@echo "make test-slurm  the sbatch recipes on a local one-node Slurm cluster (tests/test_slurm.py)"
	@echo "make kernels  build kernels/build/libsapo_kernels_{host,cuda}.so (the CUDA one needs nvcc)"
	@echo "make test-kernels-native  the kernels' C++ checks: host run, ThreadSanitizer, nvcc build"
	@echo "make paper-sweep the SAPO paper's comparison at small scale (recipes/sweeps/paper_small.yaml, ~50 min)"
	@echo "make bench    the benchmarks (tools/bench_*.py): fused loss, train step, rollout, RL step vs TRL"
	@echo "make gpu-wheels  download the wheels the GPU check installs offline into $(GPU_WHEELS)"
	@echo "make gpu-check   the GPU check (tools/gpu_check.sh; GPU_CHECK_ARGS=--quick): GPU steps skipped without one"

$(STAMP): setup.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# TRL for the side-by-side RL-step benchmark (and its test)
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev,bench]"
	touch $(BENCH_STAMP)

# SGLang in its own environment; tools/sglang_cpu_stubs stands in for the two imports without a CPU build
$(SGLANG_STAMP): requirements/sglang-cpu.txt
	test -x $(SGLANG_VENV)/bin/python || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/pip install --quiet -r requirements/sglang-cpu.txt
	$(SGLANG_VENV)/bin/pip install --quiet --no-deps sglang==0.5.23 compressed-tensors==0.18.0
	touch $(SGLANG_STAMP)

sglang-env: $(SGLANG_STAMP)

$(MLFLOW_STAMP): requirements/mlflow-server.txt
	test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install --quiet -r requirements/mlflow-server.txt
	touch $(MLFLOW_STAMP)

mlflow-server-env: $(MLFLOW_STAMP)

slurm-env:
	@dpkg -s $(SLURM_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(SLURM_PACKAGES); }

kernels: kernels-build

# The test suite runs the CUDA source through its host build, so it needs that library (not nvcc).
test: $(STAMP) $(BENCH_STAMP) $(KERNEL_HOST_LIB) $(SGLANG_STAMP) $(MLFLOW_STAMP) slurm-env
	SAPO_REQUIRE_KERNELS=1 SAPO_REQUIRE_SLURM=1 SAPO_SGLANG_PYTHON=$(SGLANG_VENV)/bin/python \
		SAPO_MLFLOW_PYTHON=$(MLFLOW_VENV)/bin/python $(PY) -m pytest tests

test-faults: $(STAMP) $(SGLANG_STAMP) $(MLFLOW_STAMP)
	SAPO_SGLANG_PYTHON=$(SGLANG_VENV)/bin/python $(PY) -m pytest -m fault tests

test-slurm: $(STAMP) slurm-env
	SAPO_REQUIRE_SLURM=1 $(PY) -m pytest tests/test_slurm.py

test-kernels-native:
	bash kernels/tests_host/run.sh
	bash kernels/tests_host/run_sapo_kernels.sh

bench: $(BENCH_STAMP) $(SGLANG_STAMP)
	$(PY) tools/bench_fused_loss.py --with-megatron
	$(PY) tools/bench_train_step.py
	$(PY) tools/bench_rollout.py
	$(PY) tools/bench_rl_step.py

gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -c $(CONSTRAINTS) -d $(GPU_WHEELS) megatron-core psutil
	@ls $(GPU_WHEELS)
	@du -sh $(GPU_WHEELS)

# No install first: on a GPU machine the check uses the Python it finds there (see tools/gpu_check.sh)
gpu-check:
	GPU_WHEELS=$(GPU_WHEELS) bash tools/gpu_check.sh $(GPU_CHECK_ARGS)

# The demo's inputs (recipes/tiny_cpu.yaml reads them from outputs/demo): a tiny Qwen3-MoE after a short supervised
# warm start, and sort-digits prompt files. Each `make demo` then trains from scratch into outputs/demo/run.
DEMO := outputs/demo

$(DEMO)/model/config.json: $(STAMP) tools/prepare_demo.py tools/tiny_models.py
	$(PY) tools/prepare_demo.py $(DEMO)

demo: $(STAMP) $(DEMO)/model/config.json
	rm -rf $(DEMO)/run
	$(VENV)/bin/megatron-sapo train recipes/tiny_cpu.yaml
	$(VENV)/bin/megatron-sapo plot $(DEMO)/run

# The SAPO paper's comparison at small scale (recipes/sweeps/paper_small.yaml: 36 runs, about 50 min on 2 cores),
# resumable: run it again to continue; the report lands in outputs/sweeps/paper_small/report
paper-sweep: $(STAMP) $(DEMO)/model/config.json
	$(VENV)/bin/megatron-sapo sweep recipes/sweeps/paper_small.yaml --jobs 2

clean:
	rm -rf $(VENV) $(SGLANG_VENV) $(MLFLOW_VENV) build *.egg-info $(OUT) $(KERNEL_BUILD)
