#!/usr/bin/env python
"""Everything the CPU demo (recipes/tiny_cpu.yaml) starts from, built offline in a few seconds:

- OUT/model: a tiny Qwen3-MoE (hidden 64, 2 layers, 4 experts top-2, character tokenizer) given a short supervised
  warm start on the sort-digits task, as RL runs start from an SFT checkpoint. The warm start is deliberately short:
  it teaches the answer format and leaves the sampled reward low (~0.1-0.3), so that RL has room to show;
- OUT/train.jsonl and OUT/eval.jsonl: sort-digits prompts ("3142:" -> "1234") from disjoint seeds.

    python tools/prepare_demo.py outputs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402


def warm_start(model, tokenizer, examples: list[dict], *, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Teacher-forced cross-entropy on the answer and EOS tokens of prompt + answer; returns the last loss."""
    import torch

    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        rows = [examples[(step * batch_size + i) % len(examples)] for i in range(batch_size)]
        ids, labels = [], []
        for row in rows:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        out = model(input_ids=torch.tensor(ids), labels=torch.tensor(labels))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        loss = out.loss.detach()
    model.eval()
    return float(loss)


def prepare(out: Path, *, sft_steps: int = 50, sft_batch_size: int = 64, sft_lr: float = 2e-3, seed: int = 0,
            train_size: int = 20000, eval_size: int = 128) -> Path:
    from megatron_sapo.data import sort_digits_examples, write_jsonl

    out = Path(out)
    began = time.monotonic()
    tokenizer = tiny_models.build_tokenizer()
    model = tiny_models.build("qwen3_moe", out / "model", seed=seed, vocab_size=len(tokenizer))
    train = sort_digits_examples(train_size, seed=seed + 1)
    loss = warm_start(model, tokenizer, train, steps=sft_steps, batch_size=sft_batch_size, lr=sft_lr, seed=seed)
    model.save_pretrained(out / "model")
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(sort_digits_examples(eval_size, seed=seed + 2), out / "eval.jsonl")
    (out / "prepare.json").write_text(json.dumps({"sft_steps": sft_steps, "sft_batch_size": sft_batch_size,
                                                  "sft_lr": sft_lr, "seed": seed, "sft_final_loss": loss}) + "\n")
    print(f"demo inputs in {out} ({time.monotonic() - began:.1f} s; warm start {sft_steps} steps, "
          f"final loss {loss:.3f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sft-steps", type=int, default=50)
    parser.add_argument("--sft-batch-size", type=int, default=64)
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prepare(args.out, sft_steps=args.sft_steps, sft_batch_size=args.sft_batch_size, sft_lr=args.sft_lr,
            seed=args.seed)


if __name__ == "__main__":
    main()
