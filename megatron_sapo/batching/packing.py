"""Packed micro-batches as tensors: several rows' tokens one after another in one row, and back.

A packed micro-batch (MicroBatch.segments) holds its rows' first segments[i] tokens back to back, then padding up
to its length. Attention must not cross from one row to the next and positions restart at every row: the model
gets each row's boundaries as cumulative lengths (`cu_seqlens`, Megatron-Core's PackedSeqParams, THD layout).
The position where one row's last token would predict the next row's first token predicts nothing.

The policy loss works on rows ([rows, positions]: per-sequence means, GSPO's sequence ratio, Dr.GRPO's constant),
so a packed micro-batch's hidden states are gathered back into rows for it (`loss_groups`, `unpack_index`): rows
of similar length together, each group as wide as its longest row, so the output layer computes at most twice a
group's real positions (a row less than half the group's first starts a new group).

Memory: pack and unpack copy the micro-batch's tokens once (its per-token tensors: ids, masks, routes); the
gathered hidden states of a loss group are [rows, longest, hidden], at most twice the group's tokens.
"""

from __future__ import annotations

import torch

from .plan import MicroBatch


def starts(micro_batch: MicroBatch) -> list[int]:
    """Where each row's tokens begin in the packed row."""
    out, at = [], 0
    for n in micro_batch.segments:
        out.append(at)
        at += n
    return out


def cu_seqlens(micro_batch: MicroBatch, length: int) -> torch.Tensor:
    """[rows + 1] int32 cumulative lengths over a packed row of `length` positions (>= micro_batch.length, as the
    model pads it): the padding after the last row is a sequence of its own, so every position is in one."""
    bounds = [*starts(micro_batch), sum(micro_batch.segments)]
    if length > bounds[-1]:
        bounds.append(length)
    return torch.tensor(bounds, dtype=torch.int32)


def pack(tensor: torch.Tensor, micro_batch: MicroBatch, fill, shift: int = 0) -> torch.Tensor:
    """[1, length - shift, ...]: each row's first segments[i] - shift positions of a per-token tensor [B, S, ...]
    (shift 1: the predicted positions [B, S - 1], whose last one in each row then predicts nothing and holds
    `fill`), one after another, then `fill` up to the micro-batch's length."""
    parts = []
    for row, n in zip(micro_batch.rows, micro_batch.segments):
        parts.append(tensor[row, :n - shift])
        if shift:
            parts.append(tensor.new_full((shift, *tensor.shape[2:]), fill))
    out = torch.cat(parts) if parts else tensor.new_empty((0, *tensor.shape[2:]))
    extra = micro_batch.length - out.shape[0]
    if extra > 0:
        out = torch.cat([out, out.new_full((extra, *out.shape[1:]), fill)])
    return out[:micro_batch.length - shift][None]


def unpack_into(out: torch.Tensor, micro_batch: MicroBatch, packed: torch.Tensor, shift: int = 1) -> None:
    """pack's inverse into the rows of `out` [B, S - shift]: packed [1, length - shift] (shift 1: predicted
    positions, each row's first segments[i] - 1)."""
    for row, start, n in zip(micro_batch.rows, starts(micro_batch), micro_batch.segments):
        out[row, :n - shift] = packed[0, start:start + n - shift]


def loss_groups(micro_batch: MicroBatch) -> list[tuple[list[int], int]]:
    """The rows of a packed micro-batch (positions in micro_batch.rows) in groups for the loss, with each group's
    width: rows by decreasing length; a row shorter than half its group's first starts a new group."""
    order = sorted(range(len(micro_batch.rows)), key=lambda i: (-micro_batch.segments[i], i))
    groups: list[tuple[list[int], int]] = []
    for i in order:
        n = micro_batch.segments[i]
        if groups and 2 * n >= groups[-1][1]:
            groups[-1][0].append(i)
        else:
            groups.append(([i], n))
    return groups


def unpack_index(micro_batch: MicroBatch, group: list[int], width: int) -> torch.Tensor:
    """[len(group), width] positions in the packed row of each group row's tokens (past a row's end: its last
    token, which the row's mask leaves out of the loss)."""
    first = starts(micro_batch)
    t = torch.arange(width)
    return torch.stack([first[i] + t.clamp(max=micro_batch.segments[i] - 1) for i in group])
