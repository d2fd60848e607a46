#!/usr/bin/env bash
# Checks of kernels/sapo_kernels.cu on a machine without a GPU:
#   1. builds the host library with the project's own rule (kernels/kernels.mk), links sapo_kernels_check.cpp
#      against it and runs it (double-precision references of the three ABI functions);
#   2. builds the kernels and the driver as one ThreadSanitizer executable and runs it (exit 66: TSan reported);
#   3. builds the CUDA library with the project's nvcc rule (compile and link only: nothing can run it here).
# Everything is built in a temporary folder. Overrides: CXX, NVCC, CUDA_HOME. Exit status 0 only if every step
# passed; step 3 is skipped when nvcc is missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
CXX="${CXX:-g++}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${NVCC:-$(command -v "$CUDA_HOME/bin/nvcc" || command -v nvcc || echo nvcc)}"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
make_kernels() { make --no-print-directory -C "$root" -f kernels/kernels.mk KERNEL_BUILD="$build" \
  HOST_CXX="$CXX" NVCC="$NVCC" CUDA_HOME="$CUDA_HOME" "$@"; }

echo "== 1. host library (kernels/kernels.mk) + sapo_kernels_check"
make_kernels "$build/libsapo_kernels_host.so"
"$CXX" -std=c++20 -O2 -Wall -Wextra "$here/sapo_kernels_check.cpp" -L"$build" -lsapo_kernels_host \
  -Wl,-rpath,"$build" -o "$build/sapo_kernels_check"
"$build/sapo_kernels_check"

echo "== 2. ThreadSanitizer build"
"$CXX" -std=c++20 -O1 -g -fsanitize=thread -pthread -Wno-unknown-pragmas -I"$CUDA_HOME/include" -I"$root/kernels" \
  -x c++ "$root/kernels/sapo_kernels.cu" -x none "$here/sapo_kernels_check.cpp" -o "$build/sapo_kernels_check_tsan"
"$build/sapo_kernels_check_tsan"
echo "PASS tsan: no data race reported"

echo "== 3. CUDA library (kernels/kernels.mk)"
if ! command -v "$NVCC" >/dev/null; then
  echo "SKIP nvcc: $NVCC not found"
  exit 0
fi
make_kernels "$build/libsapo_kernels_cuda.so"
echo "PASS nvcc: $(basename "$build")/libsapo_kernels_cuda.so built"
