"""Loss aggregation modes, expressed as per-token weights so that loss = sum(token_loss * weight).

Writing every mode as a weight tensor gives one code path for the plain loss, for micro-batched training (pass the
global counts so that micro-batch losses add up to the full batch's loss) and for the fused kernels, which take the
weight per token instead of knowing about modes.

Modes (m = response mask, |y_i| = tokens of row i, S = rows with at least one token, B = all rows):
  token-mean               m / sum(m)
  seq-mean-token-sum       m / S
  seq-mean-token-mean      m / (|y_i| * S)          (the SAPO paper's aggregation; the default)
  seq-mean-token-sum-norm  m / (B * L)              (Dr.GRPO; L = loss_norm_length, default the padded length T)
Rows without tokens are left out of the sequence means; an all-zero mask is rejected by the caller.
"""

from __future__ import annotations

import torch

from .config import LOSS_AGG_MODES, check_choice
from .masking import masked_row_sum


def token_weights(
    mask: torch.Tensor,
    mode: str,
    *,
    loss_norm_length: int | None = None,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token weights [B, T] of aggregation `mode` for a boolean mask [B, T].

    total_tokens / total_seqs replace this batch's own counts (tokens for token-mean, sequences for the seq-mean
    modes) when the batch is one micro-batch of a larger one.
    """
    check_choice("loss_agg_mode", mode, LOSS_AGG_MODES)
    m = mask.to(dtype)
    if mode == "token-mean":
        denom = m.sum() if total_tokens is None else float(total_tokens)
        return m / denom
    lengths = m.sum(dim=-1, keepdim=True)
    if mode == "seq-mean-token-sum-norm":
        num_rows = mask.shape[0] if total_seqs is None else total_seqs
        norm = mask.shape[-1] if loss_norm_length is None else loss_norm_length
        return m / (float(num_rows) * float(norm))
    num_seqs = (lengths > 0).sum().to(dtype) if total_seqs is None else float(total_seqs)
    if mode == "seq-mean-token-sum":
        return m / num_seqs
    return m / (lengths.clamp(min=1.0) * num_seqs)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, **kwargs) -> torch.Tensor:
    """Scalar loss of a per-token loss [B, T] under `mode`; positions outside the mask never contribute (not even NaN)."""
    weights = token_weights(mask, mode, dtype=loss_mat.dtype, **kwargs).to(loss_mat.device)
    return masked_row_sum(loss_mat * weights, mask).sum()
