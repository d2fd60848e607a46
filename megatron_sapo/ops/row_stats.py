"""Per-row softmax statistics and their vocab-parallel merge: the one place where log-probs come from.

Each tensor-parallel rank holds a vocab shard of every row's logits. A backend reduces its shard to four floats per
row (RowStats); `merge_row_stats` combines the ranks with two collectives in total, whatever the number of rows:
  1. all-reduce(MAX) of the row maxima;
  2. all-reduce(SUM) of one packed [4, n] tensor: sum-exp and sum-exp*z rescaled to the global maximum, the target
     logit (only its owner contributes a non-zero) and an ownership count (which must come to exactly 1).
`finalize` turns merged statistics into log-probs, log-sum-exp and entropy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist


class RowStats(NamedTuple):
    """Float32 [n] statistics of z = logits / temperature over one vocab shard (or the whole vocab once merged)."""

    max: torch.Tensor  # max_v z
    sumexp: torch.Tensor  # sum_v exp(z - max)
    zexp: torch.Tensor | None  # sum_v exp(z - max) (max - z) >= 0, for the entropy (no cancellation)
    target: torch.Tensor  # z at the target column if this shard owns it, else 0


def group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def merge_row_stats(stats: RowStats, owned: torch.Tensor, group) -> tuple[RowStats, torch.Tensor]:
    """Merge shard statistics across `group` (2 collectives); returns the global statistics and, per row, how many
    ranks own its target (1 for every valid row)."""
    if group_size(group) == 1:
        return stats, owned.to(torch.float32)
    global_max = stats.max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # A shard row of only -inf has sumexp 0 and max -inf: its terms must be 0, not exp(nan) or 0 * inf.
    live = stats.sumexp > 0
    zero = torch.zeros_like(stats.sumexp)
    scale = torch.where(live, torch.exp(stats.max - global_max), zero)
    if stats.zexp is None:
        zexp = zero
    else:  # re-centre sum exp(z - m)(m - z) on the global max M: add sumexp * (M - m), then rescale
        zexp = torch.where(live, (stats.zexp + stats.sumexp * (global_max - stats.max)) * scale, zero)
    packed = torch.stack([stats.sumexp * scale, zexp, stats.target, owned.to(torch.float32)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    merged = RowStats(global_max, packed[0], None if stats.zexp is None else packed[1], packed[2])
    return merged, packed[3]


def finalize(stats: RowStats, ignored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log_probs, lse, entropy) [n] from whole-vocab statistics; ignored rows get 0 everywhere."""
    zero = torch.zeros((), dtype=torch.float32, device=stats.max.device)
    lse = torch.where(ignored, zero, stats.max + torch.log(stats.sumexp))
    logp = torch.where(ignored, zero, stats.target - lse)
    entropy = None
    if stats.zexp is not None:
        entropy = torch.where(ignored, zero, stats.zexp / stats.sumexp + torch.log(stats.sumexp))
    return logp, lse, entropy


def check_rows(logp: torch.Tensor, owners: torch.Tensor, ignored: torch.Tensor, vocab_hint: str) -> None:
    """One synchronisation: every valid row's target owned exactly once, and its log-prob finite."""
    unowned = (owners != 1) & ~ignored
    non_finite = ~torch.isfinite(logp) & ~ignored
    flags = torch.stack([unowned.any(), non_finite.any()]).tolist()
    if flags[0]:
        rows = unowned.nonzero().flatten()[:5].tolist()
        raise ValueError(f"target id out of range at rows {rows} (first 5): not in the vocab {vocab_hint}")
    if flags[1]:
        rows = non_finite.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"non-finite log-prob at rows {rows} (first 5): the logits hold NaN/inf there, or the target is a "
            "-inf (padded) vocab entry"
        )
