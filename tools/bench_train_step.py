#!/usr/bin/env python
"""Training-step throughput of the Megatron policy on RL-shaped batches: a SAPO step (old-log-prob forward +
forward/backward over micro-batches + optimizer) on a tiny Qwen3-MoE built offline, with the row lengths of a
rollout batch (--lengths), through today's padded micro-batches, token-budget micro-batches
(policy.max_tokens_per_micro_batch) and packed ones (policy.pack_sequences), side by side, on 1 process and on 2
(EP=2, data parallel over the rows).

    python tools/bench_train_step.py --lengths lognormal --max-len 1024 --batch 32 --budget 1024

Per path: real tokens over computed positions, old-log-prob forward + update time, its ratio to the padded path,
and the activation bytes the largest micro-batch saves for its backward (measured with autograd's saved-tensor
hooks: what the budget bounds; the CPU allocator keeps no peak to read). `--lengths fixed` is every row at
--max-len (the old benchmark's shape). Row lengths (prompt of 32 tokens + response):
  uniform    response lengths uniform in [1, max - 32]
  lognormal  long-tailed, mean about a quarter of the longest (RL responses' usual shape), clipped to the max
  bimodal    80% short rows (max / 16), 20% at the max
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
PROMPT = 32
DISTRIBUTIONS = ("fixed", "uniform", "lognormal", "bimodal")


def sample_lengths(kind: str, rows: int, max_len: int, seed: int = 0) -> list[int]:
    """Total tokens (prompt + response) per row, deterministic from the seed."""
    g = torch.Generator().manual_seed(seed)
    top = max_len - PROMPT
    if kind == "fixed":
        response = torch.full((rows,), top)
    elif kind == "uniform":
        response = torch.randint(1, top + 1, (rows,), generator=g)
    elif kind == "lognormal":  # sigma 1: the mean is e^0.5 times the median; median = max / 6.6 gives mean ~ max / 4
        response = (torch.randn(rows, generator=g) + torch.log(torch.tensor(top / 6.6))).exp().round().long()
    elif kind == "bimodal":
        response = torch.where(torch.rand(rows, generator=g) < 0.8, max(1, top // 16), top)
    else:
        raise ValueError(f"unknown --lengths {kind!r}; choose from {', '.join(DISTRIBUTIONS)}")
    return [PROMPT + int(r) for r in response.clamp(1, top)]


class ActivationMeter:
    """Bytes of activations that a forward of `module` saves for its backward (parameters not counted), the largest
    forward's: counted between the module's pre-forward and forward hooks, so a recompute's re-forward inside the
    backward (one layer's activations at a time, freed as it goes) is not counted."""

    def __init__(self, module):
        self.current, self.largest, self.counting = 0, 0, False
        module.register_forward_pre_hook(lambda *_: self._open())
        module.register_forward_hook(lambda *_: self._close())

    def _open(self):
        self.current, self.counting = 0, True

    def _close(self):
        self.largest, self.counting = max(self.largest, self.current), False

    def _pack(self, t):
        if self.counting and not (t.is_leaf and t.requires_grad):
            self.current += t.numel() * t.element_size()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def peak(self) -> int:
        return self.largest


def _batch(args, lengths, vocab):
    g = torch.Generator().manual_seed(1)
    seq = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq - 1, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, PROMPT - 1:n - 1] = True
    return ids, mask, torch.randn(len(lengths), generator=g)


def _run(rank, world, args, model_dir, out):
    torch.set_num_threads(args.threads)
    from megatron.core import parallel_state as ps

    from megatron_sapo.batching import MicroBatchPlan, plan_micro_batches, plan_summary
    from megatron_sapo.batching import row_lengths
    from megatron_sapo.losses import LossConfig
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    lengths = sample_lengths(args.lengths, args.batch, args.max_len)
    results = {}
    for path in ("padded", "budget", "packed"):
        budget = 0 if path == "padded" else args.budget
        policy = Policy(PolicyConfig(model_path=model_dir, micro_batch_size=args.micro_batch, lr=1e-4,
                                     expert_model_parallel_size=world, max_tokens_per_micro_batch=budget,
                                     pack_sequences=path == "packed"))
        ids, mask, adv = _batch(args, lengths, policy.arch.vocab_size)
        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if budget:
            plans, _ = plan_micro_batches(row_lengths(mask), dp=dp, max_tokens=budget, **policy.plan_layout())
            rows, micro = torch.tensor(plans[r].rows, dtype=torch.long), plans[r].micro_batches
        else:
            per_rank = len(lengths) // dp
            plans = [MicroBatchPlan.fixed(per_rank, args.micro_batch, ids.shape[1])] * dp
            rows, micro = torch.arange(r, len(lengths), dp), None
        summary = plan_summary(plans, row_lengths(mask), policy.plan_layout()["multiple"])
        meter = ActivationMeter(policy.module)
        seconds = []
        for step in range(args.steps + 1):  # the first is a warm-up
            start = time.perf_counter()
            old, _ = policy.old_log_probs(ids[rows], micro_batches=micro)
            with meter.hooks():
                policy.train_step(PolicyBatch(ids[rows], mask[rows], adv[rows], old_log_probs=old,
                                              micro_batches=micro), LossConfig())
            seconds.append(time.perf_counter() - start)
        results[path] = {"seconds": sum(seconds[1:]) / args.steps, "activation_bytes": meter.peak(), **summary}
        del policy
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", choices=DISTRIBUTIONS, default="lognormal")
    parser.add_argument("--max-len", type=int, default=512, help="the longest row's tokens (prompt + response)")
    parser.add_argument("--batch", type=int, default=32, help="rows of the mini-batch")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch on the padded path")
    parser.add_argument("--budget", type=int, default=0, help="max_tokens_per_micro_batch (0: --max-len)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worlds", default="1,2", help="process counts to run (2: EP=2, data parallel rows)")
    args = parser.parse_args()
    args.budget = args.budget or args.max_len
    if args.max_len <= PROMPT + 1:
        parser.error(f"--max-len must exceed the {PROMPT}-token prompt")
    import tiny_models

    lengths = sample_lengths(args.lengths, args.batch, args.max_len)
    print(f"tiny Qwen3-MoE; {args.batch} rows, {args.lengths} lengths (mean {sum(lengths) / len(lengths):.0f}, "
          f"max {max(lengths)}); padded: {args.micro_batch} rows per micro-batch; budget: {args.budget} tokens; "
          f"{args.threads} thread(s) per process; SAPO old-log-prob forward + update", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_models.build("qwen3_moe", Path(tmp) / "model")
        for world in (int(w) for w in args.worlds.split(",")):
            out = Path(tmp) / f"result{world}.json"
            spawn_local(_run, world, world, args, str(Path(tmp) / "model"), str(out))
            results = json.loads(out.read_text())
            label = "1 process" if world == 1 else f"{world} processes, EP={world}"
            base = results["padded"]["seconds"]
            for path, r in results.items():
                print(f"{label:<20} {path:<7} real/computed {r['real'] / r['computed']:5.2f}   "
                      f"micro-batches {r['micro_batches']:4.0f}   step {r['seconds'] * 1e3:8.1f} ms "
                      f"(x{r['seconds'] / base:.2f})   {r['real'] / r['seconds']:9.0f} real tokens/s   "
                      f"largest micro-batch's activations {r['activation_bytes'] / 2**20:7.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
