"""Rollout/training mismatch corrections: importance weights from the rollout engine's log-probs.

SGLang samples with other kernels than the trainer, so the "old" policy the trainer recomputes differs slightly from
the policy that produced the tokens. With w = exp(old_log_probs - rollout_log_probs), detached:
  tis  truncated importance sampling: multiply the token loss by min(w, cap)
  mis  masked importance sampling (IcePop): keep w where low <= w <= high, use 0 elsewhere
at one of three levels:
  token      each token its own w
  sequence   one weight per sequence, the product of its token weights
  geometric  one weight per sequence, the geometric mean of its token weights
A weight of 0 removes a token's loss but not the token from the aggregation's normaliser.
"""

from __future__ import annotations

import torch

from .masking import masked_row_mean, masked_row_sum

# exp(80) is still finite in fp32; the sequence product of many token weights would overflow otherwise.
_MAX_LOG_WEIGHT = 80.0


def rollout_correction_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    level: str,
    tis_cap: float,
    mis_low: float,
    mis_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached weights [B, T] for the token losses, and the boolean [B, T] of tokens the correction changed
    (truncated for tis, masked out for mis)."""
    with torch.no_grad():
        zero = torch.zeros((), dtype=old_log_probs.dtype, device=old_log_probs.device)
        log_w = torch.where(mask, old_log_probs - rollout_log_probs, zero)
        if level == "sequence":
            log_w = masked_row_sum(log_w, mask).clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT)[:, None].expand_as(mask)
        elif level == "geometric":
            log_w = masked_row_mean(log_w, mask)[:, None].expand_as(mask)
        w = torch.exp(log_w.clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT))
        if mode == "tis":
            changed = (w > tis_cap) & mask
            weights = w.clamp(max=tis_cap)
        else:
            changed = ((w < mis_low) | (w > mis_high)) & mask
            weights = torch.where(changed, zero, w)
    return weights, changed
