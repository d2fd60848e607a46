"""Small ragged batches for the loss tests: rows of different lengths, one empty row, garbage in the padding."""

import torch

LENGTHS = (9, 1, 0, 5, 7)


def ragged_batch(seed=0, *, spread=0.3, per_token_adv=False, dtype=torch.float64, lengths=LENGTHS, pad=float("nan")):
    g = torch.Generator().manual_seed(seed)
    batch, seq_len = len(lengths), max(lengths)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    old = -torch.rand(batch, seq_len, generator=g, dtype=torch.float64) * 3 - 0.05
    lp = old + spread * torch.randn(batch, seq_len, generator=g, dtype=torch.float64)
    lp = torch.where(mask, lp, torch.full_like(lp, pad)).to(dtype).requires_grad_()
    old = torch.where(mask, old, torch.full_like(old, pad)).to(dtype)
    if per_token_adv:
        adv = torch.randn(batch, seq_len, generator=g, dtype=torch.float64).to(dtype)
    else:
        adv = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.0], dtype=torch.float64)[:batch].to(dtype)
    return lp, old, adv, mask


def per_token(adv, mask):
    return adv[:, None].expand(mask.shape) if adv.dim() == 1 else adv
