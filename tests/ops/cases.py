"""Logits cases for the fused ops, each with what makes it hard."""

import torch


def make_logits(case: str, n: int, vocab: int, *, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (n,), generator=g)
    if case == "all_negative":
        logits = -logits.abs() - 40.0  # large negative logits: a naive exp without max-shift underflows
    elif case == "neg_inf_padding":
        pad = max(1, vocab // 8)
        logits[:, -pad:] = float("-inf")  # padded vocab entries, as in a TP-padded embedding
        targets = torch.randint(0, vocab - pad, (n,), generator=g)
    elif case == "peaked":
        logits[torch.arange(n), targets] += 30.0  # probability ~1 at the target: logp ~ 0, gradients tiny
    return logits.to(dtype), targets
