"""Packed micro-batches as tensors (megatron_sapo/batching/packing.py): rows back to back and back again, the
boundaries the model gets, and the loss groups' bound on the output layer's padding."""

import random

import torch

from megatron_sapo.batching import MicroBatch
from megatron_sapo.batching.packing import cu_seqlens, loss_groups, pack, starts, unpack_index, unpack_into

PACKED = MicroBatch((2, 0, 3), 11, segments=(4, 3, 2))  # 9 tokens of three rows, then 2 of padding


def test_pack_puts_rows_back_to_back():
    t = torch.arange(4 * 6).view(4, 6)
    assert pack(t, PACKED, -1).tolist() == [[12, 13, 14, 15, 0, 1, 2, 18, 19, -1, -1]]
    # predicted positions: each row's last token predicts nothing; 10 positions for 11 tokens
    predicted = t[:, 1:]
    assert pack(predicted, PACKED, -1, shift=1).tolist() == [[13, 14, 15, -1, 1, 2, -1, 19, -1, -1]]
    routes = torch.arange(4 * 6 * 2).view(4, 6, 2)  # per-token tensors with more dimensions
    assert pack(routes, PACKED, -1).shape == (1, 11, 2) and pack(routes, PACKED, -1)[0, 4].tolist() == [0, 1]


def test_unpack_is_packs_inverse_on_the_rows():
    t = torch.randn(4, 5)  # predicted positions of rows of 6 tokens
    out = torch.zeros(4, 5)
    unpack_into(out, PACKED, pack(t, PACKED, 0.0, shift=1))
    for row, n in zip(PACKED.rows, PACKED.segments):
        assert torch.equal(out[row, :n - 1], t[row, :n - 1]) and (out[row, n - 1:] == 0).all()
    assert (out[1] == 0).all()  # a row not in the micro-batch is left alone


def test_boundaries_cover_every_position():
    assert starts(PACKED) == [0, 4, 7]
    assert cu_seqlens(PACKED, 11).tolist() == [0, 4, 7, 9, 11]  # the padding is a sequence of its own
    assert cu_seqlens(PACKED, 12).tolist() == [0, 4, 7, 9, 12]  # (rounded up for tensor parallelism)
    assert cu_seqlens(MicroBatch((0,), 5, segments=(5,)), 5).tolist() == [0, 5]


def test_loss_groups_gather_each_row_and_bound_the_padding():
    """Every row in one group; a group's rows x width stays within twice its real tokens; each gathered row is its
    own tokens, in order, then its last token repeated (masked out by the row's mask)."""
    rng = random.Random(0)
    for _ in range(200):
        segments = tuple(rng.randint(2, 300) for _ in range(rng.randint(1, 12)))
        mb = MicroBatch(tuple(range(len(segments))), sum(segments), segments=segments)
        groups = loss_groups(mb)
        assert sorted(i for group, _ in groups for i in group) == list(range(len(segments)))
        for group, width in groups:
            assert width == max(segments[i] for i in group)
            assert len(group) * width <= 2 * sum(segments[i] for i in group)
    index = unpack_index(PACKED, [0, 2], 4)
    assert index.tolist() == [[0, 1, 2, 3], [7, 8, 8, 8]]
