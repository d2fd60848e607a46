"""An independent reference for the loss library: explicit Python loops over rows and tokens, in float64, written
from ../shared/ALGORITHM.md without reusing any library code. Slow by design; used on small shapes only.

Sequence losses (sapo_seq, gspo) are written in their natural sequence form: the sequence ratio s_i with its
gradient through every token, the sequence loss standing on each token. The library's token form must agree.
"""

import math

import torch

CLAMP = 20.0


def _sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def token_loss_matrix(loss_type, lp, old, adv, mask, *, tau_pos=1.0, tau_neg=1.05, eps_low=0.2, eps_high=0.2,
                      clip_c=3.0):
    """Per-token losses as a nested list of 0-dim tensors (None outside the mask); adv is [B, T]."""
    rows = []
    for i in range(lp.shape[0]):
        toks = [t for t in range(lp.shape[1]) if bool(mask[i, t])]
        lrs = {t: torch.clamp(lp[i, t] - old[i, t], -CLAMP, CLAMP) for t in toks}
        row = [None] * lp.shape[1]
        if loss_type in ("sapo_seq", "gspo"):
            if toks:
                s = torch.exp(sum(lrs.values()) / len(toks))
                a = sum(float(adv[i, t]) for t in toks) / len(toks)
                if loss_type == "sapo_seq":
                    tau = tau_pos if a > 0 else tau_neg
                    seq_loss = -_sigmoid(tau * (s - 1)) * 4 / tau * a
                else:
                    seq_loss = torch.maximum(-a * s, -a * torch.clamp(s, 1 - eps_low, 1 + eps_high))
                for t in toks:
                    row[t] = seq_loss
            rows.append(row)
            continue
        for t in toks:
            a = float(adv[i, t])
            r = torch.exp(lrs[t])
            if loss_type == "sapo":
                tau = tau_pos if a > 0 else tau_neg
                row[t] = -_sigmoid(tau * (r - 1)) * 4 / tau * a
            elif loss_type == "grpo":
                loss = torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps_low, 1 + eps_high))
                if clip_c is not None and a < 0:
                    loss = torch.minimum(loss, torch.tensor(-a * clip_c, dtype=lp.dtype))
                row[t] = loss
            elif loss_type == "cispo":
                row[t] = -a * torch.clamp(r.detach(), 1 - eps_low, 1 + eps_high) * lp[i, t]
            else:
                raise AssertionError(loss_type)
        rows.append(row)
    return rows


def aggregate(rows, mode, *, norm_length=None):
    """Reduce a nested list of per-token losses (None = masked) by `mode`, one loop per mode."""
    nonempty = [[x for x in row if x is not None] for row in rows]
    nonempty = [row for row in nonempty if row]
    if mode == "token-mean":
        flat = [x for row in nonempty for x in row]
        return sum(flat) / len(flat)
    if mode == "seq-mean-token-sum":
        return sum(sum(row) for row in nonempty) / len(nonempty)
    if mode == "seq-mean-token-mean":
        return sum(sum(row) / len(row) for row in nonempty) / len(nonempty)
    if mode == "seq-mean-token-sum-norm":
        length = len(rows[0]) if norm_length is None else norm_length
        return sum(sum(row) for row in nonempty) / (len(rows) * length)
    raise AssertionError(mode)


def gate_weight(r, tau):
    """sech^2(tau (r - 1) / 2), written with cosh rather than with the sigmoid the library uses."""
    return 1.0 / math.cosh(tau * (r - 1.0) / 2.0) ** 2
