#!/usr/bin/env bash
# Self-test of kernels/host/cuda_on_cpu.h on a machine without a GPU:
#   1. builds selftest_kernels.cu the way the project builds host kernels (g++ -shared -fPIC -x c++), links the
#      driver against it, runs it, and checks that an invalid full-mask shuffle aborts with a message;
#   2. builds the same sources as one ThreadSanitizer executable and runs it (exit 66 means TSan reported);
#   3. compiles the same .cu with nvcc for sm_80 and sm_90 (compile only: nothing can run it here).
# Overrides: CXX, NVCC, CUDA_HOME. Exit status 0 only if every step passed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CXX="${CXX:-g++}"
NVCC="${NVCC:-nvcc}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
cd "$here"

echo "== 1. host build (g++ -O2)"
"$CXX" -std=c++20 -O2 -shared -fPIC -Wno-unknown-pragmas -I"$CUDA_HOME/include" -x c++ selftest_kernels.cu \
  -o "$build/libselftest.so"
"$CXX" -std=c++20 -O2 selftest_main.cpp -L"$build" -lselftest -Wl,-rpath,"$build" -o "$build/selftest"
"$build/selftest"
# The subshell keeps bash's own "Aborted" notice in the log too.
if ("$build/selftest" misuse; exit $?) >"$build/misuse.log" 2>&1; then status=0; else status=$?; fi
if [[ $status -ne 134 ]] || ! grep -q "a lane of the warp exited" "$build/misuse.log"; then
  cat "$build/misuse.log"
  echo "FAIL misuse: expected an abort (status 134) with a message, got status $status"
  exit 1
fi
echo "PASS misuse: shuffle reading an exited lane aborted with a message"

echo "== 2. ThreadSanitizer build"
"$CXX" -std=c++20 -O1 -g -fsanitize=thread -Wno-unknown-pragmas -I"$CUDA_HOME/include" -x c++ selftest_kernels.cu \
  -x none selftest_main.cpp -o "$build/selftest_tsan"
"$build/selftest_tsan"
echo "PASS tsan: no data race reported"

echo "== 3. nvcc compile (sm_80, sm_90)"
if ! command -v "$NVCC" >/dev/null; then
  echo "SKIP nvcc: $NVCC not found"
  exit 0
fi
"$NVCC" -std=c++20 -c -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 selftest_kernels.cu \
  -o "$build/selftest_kernels.o"
echo "PASS nvcc: selftest_kernels.cu compiled for sm_80 and sm_90"
