"""Micro-batches sized by tokens, not by the longest row: the plan of one mini-batch over data-parallel ranks.

    rows of a mini-batch -> data-parallel ranks (balanced by computed work) -> each rank's micro-batches (a token
    budget each, every row padded only to its micro-batch's longest)

RL responses are long-tailed: padding every micro-batch to the mini-batch's longest row spends most of a step on
padding. Here each rank sorts its rows by length and fills micro-batches in that order while rows x their padded
length (the computed positions) stay within `max_tokens`; a row longer than the budget gets a micro-batch of its own.
Rows without a response token carry no loss and are not computed at all.

Guarantees (tests/batching): every row with a response token is in exactly one micro-batch of exactly one rank;
every rank has the same number of micro-batches (Megatron's schedules and the MoE all-to-alls need it: a rank with
fewer splits its largest micro-batch, or runs an empty one, a single padding row); the plan depends only on the row
lengths and the arguments, so every rank computes every rank's plan itself, without communication, and a resumed
run plans the same. Loss normalisation does not depend on the plan: the policy normalises every micro-batch by the
whole mini-batch's counts.

Cost of a row of L tokens, for the balance: L + quadratic x L^2 (quadratic: attention's score and value FLOPs per
context token over the rest of the model's FLOPs per token, from the model's shape), so long rows weigh what they
cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .partition import balanced_partition


@dataclass(frozen=True)
class MicroBatch:
    rows: tuple[int, ...]  # indices into the rank's rows; empty: one padding row (a rank with nothing left to run)
    length: int  # positions computed per row: its longest row's tokens (>= 2)

    @property
    def computed(self) -> int:
        return max(1, len(self.rows)) * self.length


@dataclass(frozen=True)
class MicroBatchPlan:
    """One rank's micro-batches over its rows (`rows`: indices into the mini-batch, in the order the micro-batches
    index them)."""

    rows: tuple[int, ...]
    micro_batches: tuple[MicroBatch, ...]

    @classmethod
    def fixed(cls, num_rows: int, size: int, seq_len: int) -> MicroBatchPlan:
        """Today's plan without a budget: consecutive rows `size` at a time, each at the full `seq_len`."""
        if size < 1 or num_rows % size:
            raise ValueError(f"batch size {num_rows} is not a multiple of micro_batch_size {size}")
        return cls(tuple(range(num_rows)),
                   tuple(MicroBatch(tuple(range(i, i + size)), seq_len) for i in range(0, num_rows, size)))

    def __len__(self) -> int:
        return len(self.micro_batches)

    @property
    def computed(self) -> int:
        return sum(mb.computed for mb in self.micro_batches)


def row_lengths(response_mask: torch.Tensor) -> list[int]:
    """Tokens each row needs computed ([B, S-1] response mask: position t predicts token t + 1): through its last
    response token; 0 for a row without any."""
    positions = torch.arange(response_mask.shape[1])
    last = torch.where(response_mask.bool(), positions, -2).amax(dim=1)
    return [int(v) for v in (last + 2).clamp(min=0)]


def row_cost(length: int, quadratic: float) -> float:
    return length + quadratic * length * length


def _round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _fill(rows: list[int], lengths: list[int], max_tokens: int, multiple: int) -> list[MicroBatch]:
    """Rows in decreasing length (ties: by index) into micro-batches of at most max_tokens computed positions."""
    order = sorted(rows, key=lambda r: (-lengths[r], r))
    out: list[list[int]] = []
    for r in order:
        if out and (len(out[-1]) + 1) * _round_up(lengths[out[-1][0]], multiple) <= max_tokens:
            out[-1].append(r)
        else:
            out.append([r])
    return [MicroBatch(tuple(mb), lengths[mb[0]]) for mb in out]


def _split_to(micro_batches: list[MicroBatch], count: int, lengths: list[int]) -> list[MicroBatch]:
    """Split the largest micro-batches (by computed positions; of two rows or more) in halves until there are
    `count`; then empty micro-batches."""
    out = list(micro_batches)
    while len(out) < count:
        splittable = [i for i, mb in enumerate(out) if len(mb.rows) > 1]
        if not splittable:
            out.append(MicroBatch((), 2))
            continue
        i = max(splittable, key=lambda j: (out[j].computed, -j))
        rows = out.pop(i).rows
        half = len(rows) // 2
        out[i:i] = [MicroBatch(part, max(lengths[r] for r in part)) for part in (rows[:half], rows[half:])]
    return out


def plan_micro_batches(lengths: list[int], *, dp: int, max_tokens: int, multiple: int = 1,
                       quadratic: float = 0.0) -> tuple[list[MicroBatchPlan], list[int]]:
    """Each data-parallel rank's plan for a mini-batch whose rows need `lengths` tokens (row_lengths), and the rows
    longer than the budget (each in a micro-batch of its own). `multiple`: lengths are computed rounded up to it
    (the tensor-parallel size under sequence parallelism)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    live = [r for r, n in enumerate(lengths) if n > 0]
    parts = balanced_partition([row_cost(lengths[r], quadratic) for r in live], dp)
    per_rank = [_fill([live[i] for i in part], lengths, max_tokens, multiple) for part in parts]
    count = max(1, max(len(mbs) for mbs in per_rank))
    plans = []
    for mbs in per_rank:
        mbs = _split_to(mbs, count, lengths)
        rows = tuple(r for mb in mbs for r in mb.rows)
        local = {r: i for i, r in enumerate(rows)}
        plans.append(MicroBatchPlan(rows, tuple(MicroBatch(tuple(local[r] for r in mb.rows), mb.length)
                                                for mb in mbs)))
    too_long = sorted(r for r in live if _round_up(lengths[r], multiple) > max_tokens)
    return plans, too_long
