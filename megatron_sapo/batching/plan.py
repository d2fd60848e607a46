"""Micro-batches sized by tokens, not by the longest row: the plan of one mini-batch over data-parallel ranks.

    rows of a mini-batch -> data-parallel ranks (balanced by computed work) -> each rank's micro-batches (a token
    budget each, every row padded only to its micro-batch's longest)

RL responses are long-tailed: padding every micro-batch to the mini-batch's longest row spends most of a step on
padding. Here each rank sorts its rows by length and fills micro-batches in that order while rows x their padded
length (the computed positions) stay within `max_tokens`; a row longer than the budget gets a micro-batch of its own.
Rows without a response token carry no loss and are not computed at all. Packed (sequence packing), each
micro-batch is one row of its rows' tokens back to back, filled first-fit decreasing up to `max_tokens`: no padding
between rows. Aligned, micro-batch i has one shape on every rank (for collectives that gather equal shapes).

Guarantees (tests/batching): every row with a response token is in exactly one micro-batch of exactly one rank;
every rank has the same number of micro-batches (Megatron's schedules and the MoE all-to-alls need it: a rank with
fewer splits its largest micro-batch, or runs an empty one, a single padding row); the plan depends only on the row
lengths and the arguments, so every rank computes every rank's plan itself, without communication, and a resumed
run plans the same. Loss normalisation does not depend on the plan: the policy normalises every micro-batch by the
whole mini-batch's counts.

Cost of a row of L tokens, for the balance: L + quadratic x L^2 (quadratic: attention's score and value FLOPs per
context token over the rest of the model's FLOPs per token, from the model's shape), so long rows weigh what they
cost.

Memory: a micro-batch's activations are those of at most `max_tokens` positions (a longer row's own, alone); the
plan itself is O(rows) integers. Measured by tools/bench_train_step.py (the activations the largest micro-batch
saves for its backward; its smoke test in tests/tools checks the bound against the padded path's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .partition import balanced_partition


@dataclass(frozen=True)
class MicroBatch:
    rows: tuple[int, ...]  # indices into the rank's rows; empty: padding rows only (a rank with nothing left to run)
    length: int  # positions computed per row: its longest row's tokens (>= 2); packed: of the one packed row
    size: int = 0  # rows computed: len(rows), or more where padding rows give it a shape shared with other ranks
    # packed (sequence packing): each row's tokens, in `rows` order, one after another in a single row of `length`
    # positions (the rest, if any, padding); empty: not packed
    segments: tuple[int, ...] = ()

    @property
    def packed(self) -> bool:
        return bool(self.segments)

    @property
    def width(self) -> int:
        """Rows computed: its own, or `size` when that is larger (padding rows), at least one; packed: one."""
        return 1 if self.packed else max(1, len(self.rows), self.size)

    @property
    def computed(self) -> int:
        return self.width * self.length


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
                   tuple(MicroBatch(tuple(range(i, i + size)), seq_len, size) for i in range(0, num_rows, size)))

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
    return [_micro_batch(mb, lengths, False) for mb in out]


def _micro_batch(rows, lengths: list[int], packed: bool) -> MicroBatch:
    rows = tuple(rows)
    if packed:
        return MicroBatch(rows, sum(lengths[r] for r in rows), segments=tuple(lengths[r] for r in rows))
    return MicroBatch(rows, max(lengths[r] for r in rows))


def _pack(rows: list[int], lengths: list[int], max_tokens: int, multiple: int) -> list[MicroBatch]:
    """Rows in decreasing length (ties: by index), each into the first packed micro-batch it fits in (first-fit
    decreasing): micro-batches of at most max_tokens tokens, rounded up to `multiple`; a longer row alone."""
    bins: list[list[int]] = []
    totals: list[int] = []
    for r in sorted(rows, key=lambda r: (-lengths[r], r)):
        for i, total in enumerate(totals):
            if _round_up(total + lengths[r], multiple) <= max_tokens:
                bins[i].append(r)
                totals[i] += lengths[r]
                break
        else:
            bins.append([r])
            totals.append(lengths[r])
    return [_micro_batch(b, lengths, True) for b in bins]


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
        mb = out.pop(i)
        half = len(mb.rows) // 2
        out[i:i] = [_micro_batch(part, lengths, mb.packed) for part in (mb.rows[:half], mb.rows[half:])]
    return out


def _lockstep(parts: list[list[int]], lengths: list[int], max_tokens: int, multiple: int) -> list[list[MicroBatch]]:
    """Every rank's micro-batch i in one shape: rows in decreasing length on each rank; micro-batch i is as long as
    the longest row left on any rank, and takes as many rows on every rank as that length allows within the budget
    (padding rows where a rank has fewer). Its shape stays within the budget, as every rank's own rows do."""
    queues = [sorted(part, key=lambda r: (-lengths[r], r)) for part in parts]
    out: list[list[MicroBatch]] = [[] for _ in parts]
    while any(queues):
        length = max(lengths[q[0]] for q in queues if q)
        count = max(1, max_tokens // _round_up(length, multiple))
        taken = [q[:count] for q in queues]
        size = max(len(t) for t in taken)
        for k, rows in enumerate(taken):
            out[k].append(MicroBatch(tuple(rows), length, size))
            queues[k] = queues[k][count:]
    return out


def plan_micro_batches(lengths: list[int], *, dp: int, max_tokens: int, multiple: int = 1,
                       quadratic: float = 0.0, aligned: bool = False,
                       packed: bool = False) -> tuple[list[MicroBatchPlan], list[int]]:
    """Each data-parallel rank's plan for a mini-batch whose rows need `lengths` tokens (row_lengths), and the rows
    longer than the budget (each in a micro-batch of its own). `multiple`: lengths are computed rounded up to it
    (the tensor-parallel size under sequence parallelism). `aligned`: micro-batch i has one shape [size, length] on
    every rank (for collectives that need the same token count on every rank of a micro-batch, such as Megatron's
    allgather MoE dispatcher under expert parallelism): filled in lockstep, at some cost in padding. `packed`:
    each micro-batch is one row of its rows' tokens one after another (first-fit decreasing into the budget);
    aligned, micro-batch i is padded to the longest of its index over the ranks (each rank's micro-batches in
    decreasing size, so that those of one index are alike)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    live = [r for r, n in enumerate(lengths) if n > 0]
    parts = [[live[i] for i in part] for part in
             balanced_partition([row_cost(lengths[r], quadratic) for r in live], dp)]
    if packed:
        per_rank = [_pack(part, lengths, max_tokens, multiple) for part in parts]
    elif aligned:
        per_rank = _lockstep(parts, lengths, max_tokens, multiple)
    else:
        per_rank = [_fill(part, lengths, max_tokens, multiple) for part in parts]
    count = max(1, max(len(mbs) for mbs in per_rank))
    per_rank = [_split_to(mbs, count, lengths) for mbs in per_rank]
    if packed and aligned:
        per_rank = [sorted(mbs, key=lambda mb: -mb.length) for mbs in per_rank]
        shared = [max(mbs[i].length for mbs in per_rank) for i in range(count)]
        per_rank = [[MicroBatch(mb.rows, n, segments=mb.segments) if mb.packed else MicroBatch((), n)
                     for mb, n in zip(mbs, shared)] for mbs in per_rank]
    plans = []
    for mbs in per_rank:
        rows = tuple(r for mb in mbs for r in mb.rows)
        local = {r: i for i, r in enumerate(rows)}
        plans.append(MicroBatchPlan(rows, tuple(MicroBatch(tuple(local[r] for r in mb.rows), mb.length, mb.size,
                                                           mb.segments) for mb in mbs)))
    too_long = sorted(r for r in live if _round_up(lengths[r], multiple) > max_tokens)
    return plans, too_long


def plan_summary(plans: list[MicroBatchPlan], lengths: list[int], multiple: int = 1) -> dict[str, float]:
    """One mini-batch's plans over every rank, in numbers: real tokens (the rows' lengths), computed positions
    (micro-batches' rows x their length rounded up to `multiple`, padding rows included), micro-batches per rank,
    and the largest rank's computed positions over the mean."""
    per_rank = [sum(mb.width * _round_up(mb.length, multiple) for mb in plan.micro_batches) for plan in plans]
    mean = sum(per_rank) / len(per_rank)
    return {"real": float(sum(lengths)), "computed": float(sum(per_rank)),
            "micro_batches": float(len(plans[0].micro_batches)), "imbalance": max(per_rank) / mean if mean else 1.0}


def take(tensor: torch.Tensor, micro_batch: MicroBatch, length: int, fill) -> torch.Tensor:
    """A micro-batch's rows of a per-row tensor ([rows] or [rows, positions, ...]): the positions cut to `length`
    (micro_batch.length for token ids, one less for the predicted positions), padding rows of `fill` appended up
    to its width. Consecutive rows are a view (the fixed plan's micro-batches cost no copy)."""
    rows = micro_batch.rows
    part = tensor[_row_index(rows, tensor.device)]
    if part.dim() > 1:
        part = part[:, :length]
    extra = micro_batch.width - len(rows)
    if extra:
        part = torch.cat([part, part.new_full((extra, *part.shape[1:]), fill)])
    return part


def put(tensor: torch.Tensor, micro_batch: MicroBatch, values: torch.Tensor) -> None:
    """take's inverse for a micro-batch's own rows: values [width, n, ...] written into their rows' first n
    positions (its padding rows dropped)."""
    rows = micro_batch.rows
    if rows:
        tensor[_row_index(rows, tensor.device), :values.shape[1]] = values[:len(rows)]


def _row_index(rows: tuple[int, ...], device) -> slice | torch.Tensor:
    """Rows as an index: a slice where they are consecutive (a view, no copy), else an index tensor."""
    if rows and list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


def attention_quadratic(*, layers: int, heads: int, head_dim: int, params_per_token: float) -> float:
    """The `quadratic` of row_cost for a transformer: a row of L tokens costs about 2 x params_per_token x L FLOPs
    in its matmuls (params_per_token: the weights each token meets, active experts only) and, causal, about
    2 x layers x heads x head_dim x L^2 in attention's scores and weighted sums (QK^T and AV over L/2 keys on
    average, 2 FLOPs per multiply-add); their ratio, per token, is this factor."""
    if params_per_token <= 0:
        raise ValueError(f"params_per_token must be > 0, got {params_per_token}")
    return layers * heads * head_dim / params_per_token
