#!/usr/bin/env bash
# One SGLang rollout server per Slurm task, started by recipes/qwen3_30b_a3b_sapo.sbatch on its rollout nodes with
# `srun --ntasks-per-node=K --gpus-per-task=TP`: Slurm binds each task to its TP GPUs (CUDA_VISIBLE_DEVICES), and
# the task serves MODEL on port BASE_PORT + SLURM_LOCALID of its node.
#
#   srun ... recipes/sglang_server.sh PYTHON MODEL BASE_PORT [SGLANG ARGUMENTS...]
#
# PYTHON is the SGLang environment's interpreter; the arguments go to sglang.launch_server as they are.
set -euo pipefail

if [[ $# -lt 3 || -z ${SLURM_LOCALID:-} ]]; then
    echo "usage: srun ... $0 PYTHON MODEL BASE_PORT [SGLANG ARGUMENTS...]" >&2
    exit 2
fi
python=$1
model=$2
port=$(($3 + SLURM_LOCALID))
shift 3
exec "$python" -m sglang.launch_server --model-path "$model" --host 0.0.0.0 --port "$port" "$@"
