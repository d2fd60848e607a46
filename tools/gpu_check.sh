#!/usr/bin/env bash
# The prepared GPU check: one command that proves every GPU path of the project on a single-GPU machine (H100 / H200:
# about 6 minutes, --quick about 4) and writes one JSON report. Without a GPU it runs what it can (the preflight, the
# kernel build and its PTX check) and reports each GPU step as skipped, with the reason.
#
#   bash tools/gpu_check.sh [--quick]          (or: make gpu-check [GPU_CHECK_ARGS=--quick])
#
# Steps, each under its own timeout; a failed step does not stop the next one:
#   preflight     nvidia-smi, Python / torch / CUDA / transformers versions, TransformerEngine or not; megatron-core
#                 and psutil installed offline from $GPU_WHEELS (make gpu-wheels) into a scratch folder when they do
#                 not import
#   build         make kernels into a scratch folder: every architecture of the shipped build (--quick: this GPU's
#                 only; sm_$SAPO_GPU_ARCH without a GPU), then tools/check_kernel_loads.py --arch compute_XX (the
#                 16-byte loads in the PTX)
#   kernel_tests  pytest -m gpu tests/ops against that build
#   sanitizer     compute-sanitizer memcheck over a few small kernel tests (left out by --quick)
#   benchmark     tools/bench_fused_loss.py on the GPU, N=16384, V=151936, bf16: fused vs naive vs Megatron's
#                 full-logits route (time, peak memory, the kernels' GB/s against the HBM peak); --quick: the logits
#                 path only, fewer repeats
#   policy        tools/gpu_check_policy.py: the tiny Qwen3-MoE through Policy on Megatron-Core, bf16, NCCL,
#                 distributed optimizer: log-probs vs transformers, 3 SAPO steps, checkpoint and export round trips,
#                 R2 replay, a packed training step (policy.pack_sequences: PyTorch's varlen flash attention with
#                 the local layers) against the padded one
#   policy_te     the same with TransformerEngine's layers (skipped when TE does not import)
#
# Environment (all optional):
#   OUT                 the report folder (default outputs/gpu_check): gpu_check.json, logs/STEP.log, steps/STEP.json
#   PYTHON              the interpreter (default .venv/bin/python when it exists, else python3)
#   GPU_WHEELS          the wheels to install offline (default outputs/gpu_wheels)
#   GPU_CHECK_BUDGET_S  seconds for all steps together (default 540, --quick 330: under a 600 s command limit); a
#                       step that cannot start within it is failed, a running one is cut at the budget's end
#   SAPO_GPU_ARCH       the build's architecture where there is no GPU (default 90)
#   GPU_CHECK_INSTALL   "always": install the wheels even where their modules import (to try the offline install)
# Exit status: 1 when a step failed (skipped steps are fine), 2 on a usage error.
set -u

SELF=$(realpath "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
cd "$REPO" || exit 2

# small cases of each kernel (stats, fused forward, backward), of the linear path, and of bf16 rows that start off a
# 16-byte boundary (the vector loads' edge cases): memcheck slows kernels ~100x
SANITIZER_CASES="(test_logprobs_and_gradient and 1000 and random) or test_policy_loss_fused_kernel"
SANITIZER_CASES+=" or test_linear_path_bf16 or (test_padded_and_offset_rows and dtype1)"

now() { echo "$EPOCHREALTIME"; }
since() { awk -v s="$1" -v e="$EPOCHREALTIME" 'BEGIN { printf "%.1f", e - s }'; }
report() { "$PY" tools/gpu_check_report.py "$@"; }

# ---- the steps: each runs in its own `bash gpu_check.sh --step NAME` under timeout, output to its log ------------

install_wheels() {
    local wheel module wheels=() modules=() missing=() wanted=() i
    for wheel in "$GPU_WHEELS"/*.whl; do
        [[ -e $wheel ]] || continue
        module=$(basename "$wheel")
        module=${module%%-*}
        [[ $module == megatron_core ]] && module=megatron.core
        wheels+=("$wheel")
        modules+=("$module")
    done
    if (( ${#wheels[@]} == 0 )); then
        echo "offline install: no wheels in $GPU_WHEELS"
        return 0
    fi
    # the wheels' modules that are missing (all with GPU_CHECK_INSTALL=always), in one interpreter start
    mapfile -t missing < <("$PY" -c 'import importlib.util, sys
for m in sys.argv[2:]:
    try:  # find_spec("megatron.core") raises, not returns None, when "megatron" itself is missing
        found = importlib.util.find_spec(m) is not None
    except ModuleNotFoundError:
        found = False
    if sys.argv[1] == "always" or not found:
        print(m)' "${GPU_CHECK_INSTALL:-auto}" "${modules[@]}")
    for i in "${!wheels[@]}"; do
        [[ " ${missing[*]} " == *" ${modules[i]} "* ]] && wanted+=("${wheels[i]}")
    done
    if (( ${#wanted[@]} == 0 )); then
        echo "offline install: nothing to install (${modules[*]} import already)"
        return 0
    fi
    echo "offline install into $DEPS: ${wanted[*]##*/}"
    if ! "$PY" -m pip install --no-index --no-deps --target "$DEPS" "${wanted[@]}"; then
        echo "pip could not install them: unpacking the wheels instead"
        for wheel in "${wanted[@]}"; do
            "$PY" -m zipfile -e "$wheel" "$DEPS" || return 1
        done
    fi
    report numbers "$NUMBERS" "installed_offline=$(printf '%s\n' "${wanted[@]##*/}" | paste -sd, -)"
}

step_preflight() {
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    install_wheels || return 1
    report probe "$SCRATCH/preflight.env" "$NUMBERS"
}

step_build() {
    local arch=${GPU_ARCH:-${SAPO_GPU_ARCH:-90}} only=() which="every architecture of the shipped build" start rc made \
        verdict
    if (( QUICK )); then
        only=("KERNEL_CUDA_ARCHS=compute_$arch")
        which="sm_$arch only"
    fi
    start=$(now)
    make --no-print-directory kernels "KERNEL_BUILD=$KERNEL_DIR" "${only[@]}" || return 1
    made="make kernels ($which) $(since "$start") s"
    report numbers "$NUMBERS" "arch=sm_$arch" "built_for=$which" "make_s=$(since "$start")" \
        "cuda_lib_bytes=$(stat -c %s "$KERNEL_DIR/libsapo_kernels_cuda.so")"
    if [[ ! -f tools/check_kernel_loads.py ]]; then
        report numbers "$NUMBERS" "ptx_check=skipped: tools/check_kernel_loads.py is not in this tree" \
            "headline=$made; PTX load check skipped (no tools/check_kernel_loads.py)"
        return 0
    fi
    start=$(now)
    "$PY" tools/check_kernel_loads.py --arch "compute_$arch"
    rc=$?
    verdict=$( (( rc == 0 )) && echo passed || echo "failed (exit $rc)")
    report numbers "$NUMBERS" "ptx_check=$verdict" "ptx_check_s=$(since "$start")" \
        "headline=$made; 16-byte loads in the compute_$arch PTX (tools/check_kernel_loads.py): $verdict"
    return "$rc"
}

step_kernel_tests() {
    local rc
    "$PY" -m pytest -q -m gpu tests/ops -p no:cacheprovider --junitxml="$SCRATCH/kernel_tests.xml"
    rc=$?
    if [[ -f $SCRATCH/kernel_tests.xml ]]; then
        report junit "$SCRATCH/kernel_tests.xml" "$NUMBERS" || rc=1
    fi
    return "$rc"
}

step_sanitizer() {
    local rc errors
    # without the caching allocator every tensor is its own allocation, so an overrun past it is caught
    # (torch's own probing CUDA calls that return errors are not memory errors: API errors are not reported)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --report-api-errors no --error-exitcode 9 \
        --print-limit 20 \
        "$PY" -m pytest -q -m gpu tests/ops -p no:cacheprovider -k "$SANITIZER_CASES" \
        --junitxml="$SCRATCH/sanitizer.xml"
    rc=$?
    errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$LOG" | tail -n 1 | grep -Eo '[0-9]+$')
    if [[ -f $SCRATCH/sanitizer.xml ]]; then
        report junit "$SCRATCH/sanitizer.xml" "$NUMBERS" || rc=1
    fi
    report numbers "$NUMBERS" "memcheck_errors=${errors:-null}" \
        "headline=memcheck: ${errors:-unknown} errors over the tests matching: $SANITIZER_CASES"
    return "$rc"
}

step_benchmark() {
    local paths=(logits linear) repeats=5
    if (( QUICK )); then
        paths=(logits)
        repeats=3
    fi
    "$PY" tools/bench_fused_loss.py --device cuda --dtype bfloat16 --n 16384 --vocab 151936 --hidden 4096 \
        --with-megatron --repeats "$repeats" --paths "${paths[@]}" --json "$NUMBERS"
}

step_policy() {
    "$PY" tools/gpu_check_policy.py --layer-spec local --out "$SCRATCH/policy" --json "$NUMBERS"
}

step_policy_te() {
    "$PY" tools/gpu_check_policy.py --layer-spec te --out "$SCRATCH/policy_te" --json "$NUMBERS"
}

if [[ ${1:-} == --step ]]; then
    "step_$2"
    exit $?
fi

# ---- the driver -------------------------------------------------------------------------------------------------

run_step() {  # NAME LIMIT_S
    local name=$1 limit=$2 left start rc status=failed reason=()
    export LOG="$REPORT_DIR/logs/$name.log" NUMBERS="$REPORT_DIR/steps/$name.json"
    rm -f "$NUMBERS"
    left=$(( BUDGET - SECONDS - 5 ))
    if (( left < 15 )); then
        report record "$REPORT" "$name" failed 0 --reason "not started: the check's budget of $BUDGET s was spent"
        return
    fi
    (( limit > left )) && limit=$left
    start=$(now)
    timeout --kill-after=10 "$limit" bash "$SELF" --step "$name" >"$LOG" 2>&1
    rc=$?
    if (( rc == 0 )); then
        status=passed
    elif (( rc == 124 || rc == 137 )); then
        reason=(--reason "timed out after $limit s")
    fi
    report record "$REPORT" "$name" "$status" "$(since "$start")" "${reason[@]}" --numbers "$NUMBERS" --log "$LOG"
}

skip_step() {  # NAME REASON
    report record "$REPORT" "$1" skipped 0 --reason "$2"
}

QUICK=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
    esac
done

if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then
    PY=$REPO/.venv/bin/python
else
    PY=$(command -v python3 || command -v python)
fi
REPORT_DIR=${OUT:-$REPO/outputs/gpu_check}
mkdir -p "$REPORT_DIR/logs" "$REPORT_DIR/steps" || exit 2
REPORT_DIR=$(cd "$REPORT_DIR" && pwd)
REPORT=$REPORT_DIR/gpu_check.json
rm -f "$REPORT" "$REPORT_DIR"/logs/*.log "$REPORT_DIR"/steps/*.json
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/sapo_gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
GPU_CHECK_MODE=$( (( QUICK )) && echo quick || echo full)
BUDGET=${GPU_CHECK_BUDGET_S:-$( (( QUICK )) && echo 330 || echo 540)}
GPU_WHEELS=${GPU_WHEELS:-$REPO/outputs/gpu_wheels}
DEPS=$SCRATCH/site-packages
KERNEL_DIR=$SCRATCH/kernels
# the repository's sources and the offline-installed wheels; kernels from this check's own build
export PY QUICK SCRATCH DEPS KERNEL_DIR GPU_WHEELS GPU_CHECK_MODE
export PYTHONPATH="$REPO:$DEPS${PYTHONPATH:+:$PYTHONPATH}" SAPO_KERNELS_DIR=$KERNEL_DIR HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
echo "gpu check ($GPU_CHECK_MODE, budget $BUDGET s) with $PY; report in $REPORT"

run_step preflight 150
HAVE_GPU=0 GPU_ARCH="" HAVE_TE=0 TE_REASON=""
NO_GPU="no GPU known: the preflight did not finish"
if [[ -f $SCRATCH/preflight.env ]]; then
    # shellcheck source=/dev/null
    source "$SCRATCH/preflight.env"
    NO_GPU="no CUDA GPU here (torch.cuda.is_available() is False)"
fi
export HAVE_GPU GPU_ARCH HAVE_TE TE_REASON
SANITIZER=$(command -v compute-sanitizer || command -v "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" || true)
export SANITIZER

if command -v nvcc >/dev/null || [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]]; then
    run_step build "$( (( QUICK )) && echo 150 || echo 240)"
else
    skip_step build "nvcc not found (on PATH or in ${CUDA_HOME:-/usr/local/cuda}/bin)"
fi
if (( HAVE_GPU )); then run_step kernel_tests 240; else skip_step kernel_tests "$NO_GPU"; fi
if (( ! HAVE_GPU )); then
    skip_step sanitizer "$NO_GPU"
elif (( QUICK )); then
    skip_step sanitizer "--quick leaves compute-sanitizer out"
elif [[ -z $SANITIZER ]]; then
    skip_step sanitizer "compute-sanitizer not found"
else
    run_step sanitizer 200
fi
if (( HAVE_GPU )); then run_step benchmark 240; else skip_step benchmark "$NO_GPU"; fi
if (( HAVE_GPU )); then run_step policy 240; else skip_step policy "$NO_GPU"; fi
if (( ! HAVE_GPU )); then
    skip_step policy_te "$NO_GPU"
elif (( ! HAVE_TE )); then
    skip_step policy_te "$TE_REASON"
else
    run_step policy_te 240
fi
report finish "$REPORT"
