#!/usr/bin/env python
"""Training-step throughput of the Megatron policy at tiny size: a SAPO step (old-log-prob forward + forward/backward
over micro-batches + optimizer) on a tiny Qwen3-MoE built offline, for 1 process and for 2 processes with expert
parallelism (EP=2, each rank half the batch). Prints tokens/s side by side.

    python tools/bench_train_step.py --batch 16 --seq 128 --steps 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_sapo.policy.parallel import spawn_local

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _run(rank, world, args, model_dir, out):
    torch.set_num_threads(args.threads)
    from megatron.core import parallel_state as ps

    from megatron_sapo.losses import LossConfig
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    policy = Policy(PolicyConfig(model_path=model_dir, micro_batch_size=args.micro_batch, lr=1e-4,
                                 expert_model_parallel_size=world))
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (args.batch, args.seq), generator=g)
    mask = torch.zeros(args.batch, args.seq - 1, dtype=torch.bool)
    mask[:, args.seq // 4:] = True
    rows = slice(r * args.batch // dp, (r + 1) * args.batch // dp)
    batch = PolicyBatch(ids[rows], mask[rows], torch.randn(args.batch, generator=g)[rows])
    policy.train_step(batch, LossConfig())  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        policy.train_step(batch, LossConfig())
    seconds = (time.perf_counter() - start) / args.steps
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "tokens": args.batch * args.seq}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        tiny_models.build("qwen3_moe", Path(tmp) / "model")
        print(f"tiny Qwen3-MoE, batch {args.batch} x {args.seq} tokens, micro-batch {args.micro_batch}, "
              f"{args.threads} thread(s) per process; SAPO step incl. old-log-prob forward")
        results = {}
        for world in (1, 2):
            out = Path(tmp) / f"result{world}.json"
            spawn_local(_run, world, world, args, str(Path(tmp) / "model"), str(out))
            results[world] = json.loads(out.read_text())
        for world, r in results.items():
            label = "1 process" if world == 1 else "2 processes, EP=2"
            print(f"{label:<20} step {r['seconds'] * 1e3:8.1f} ms   {r['tokens'] / r['seconds']:9.0f} tokens/s   "
                  f"x{results[1]['seconds'] / r['seconds']:.2f}")


if __name__ == "__main__":
    main()
