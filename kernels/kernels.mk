# Build rules of the kernel libraries; the top-level Makefile includes this file (paths are relative to the
# repository root, where make runs). One source, two libraries with the C ABI of kernels/sapo_kernels.h:
#   $(KERNEL_HOST_LIB)  g++ through kernels/host/cuda_on_cpu.h: runs the kernels on CPU threads, needs no CUDA
#                       runtime (the CUDA headers only, for the bf16/fp16 types)
#   $(KERNEL_CUDA_LIB)  nvcc: SASS for sm_80, sm_90 and, where this nvcc offers them, sm_100 and sm_120, plus PTX of
#                       the newest for later GPUs; the CUDA runtime is linked statically (KERNEL_CUDART=shared to
#                       link libcudart.so instead), so the library loads next to any torch build without
#                       LD_LIBRARY_PATH
# Overrides: CUDA_HOME, NVCC, HOST_CXX, KERNEL_CUDART, KERNEL_DEFINES (both builds, e.g. -DSAPO_BLOCK_THREADS=512).

CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(firstword $(wildcard $(CUDA_HOME)/bin/nvcc) nvcc)
HOST_CXX ?= g++
KERNEL_CUDART ?= static
KERNEL_DEFINES ?=

KERNEL_BUILD := kernels/build
KERNEL_HOST_LIB := $(KERNEL_BUILD)/libsapo_kernels_host.so
KERNEL_CUDA_LIB := $(KERNEL_BUILD)/libsapo_kernels_cuda.so
KERNEL_SOURCE := kernels/sapo_kernels.cu
KERNEL_DEPS := $(KERNEL_SOURCE) kernels/sapo_kernels.h kernels/host/cuda_on_cpu.h

# Expanded only when the CUDA rule runs, so that machines without nvcc never call it. The architectures are kept in
# this order whatever order nvcc lists them in; the last one also gets PTX.
KERNEL_CUDA_ARCHS = $(foreach arch,80 90 100 120,$(filter compute_$(arch),$(shell $(NVCC) --list-gpu-arch 2>/dev/null)))
KERNEL_GENCODE = $(foreach arch,$(KERNEL_CUDA_ARCHS),-gencode arch=$(arch),code=$(subst compute_,sm_,$(arch))) \
                 -gencode arch=$(lastword $(KERNEL_CUDA_ARCHS)),code=$(lastword $(KERNEL_CUDA_ARCHS))

.PHONY: kernels-build

kernels-build: $(KERNEL_HOST_LIB) $(KERNEL_CUDA_LIB)

$(KERNEL_HOST_LIB): $(KERNEL_DEPS)
	@mkdir -p $(KERNEL_BUILD)
	$(HOST_CXX) -std=c++20 -O2 -shared -fPIC -pthread -Wno-unknown-pragmas -I$(CUDA_HOME)/include -Ikernels \
	  $(KERNEL_DEFINES) -x c++ $(KERNEL_SOURCE) -o $@

$(KERNEL_CUDA_LIB): $(KERNEL_DEPS)
	@command -v $(NVCC) >/dev/null 2>&1 || { echo "error: $(NVCC) not found: install the CUDA toolkit or set CUDA_HOME / NVCC (building $@)" >&2; exit 1; }
	@test -n "$(strip $(KERNEL_CUDA_ARCHS))" || { echo "error: $(NVCC) --list-gpu-arch offers none of compute_80/90/100/120 (building $@)" >&2; exit 1; }
	@mkdir -p $(KERNEL_BUILD)
	$(NVCC) -O3 -std=c++20 -shared -Xcompiler -fPIC -cudart $(KERNEL_CUDART) -Ikernels $(KERNEL_GENCODE) \
	  $(KERNEL_DEFINES) $(KERNEL_SOURCE) -o $@
