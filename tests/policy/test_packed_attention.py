"""The local core attention's packed path (policy/packing.py) groups short rows into blocks with a mask that is
causal within each row and shut across rows; a long row is a block of its own. (Its exactness against each row's own
forward: tests/policy/test_token_budget.py.)"""

import torch


def test_blocks_group_short_rows_and_mask_across_them(monkeypatch):
    from megatron_sapo.policy import packing

    monkeypatch.setattr(packing, "BLOCK", 512)  # (the shipped size is smaller; the grouping is the same)
    bounds = [0, 3, 700, 705, 709, 1300]
    packing._blocks.cache_clear()  # (it keeps the last micro-batch's blocks, built at the shipped BLOCK)
    blocks = list(packing._blocks(tuple(bounds), "cpu"))
    assert [(lo, hi) for lo, hi, _ in blocks] == [(0, 3), (3, 700), (700, 709), (709, 1300)]
    mask = blocks[2][2][0, 0]  # rows of 5 and 4 tokens together
    expected = torch.ones(9, 9, dtype=torch.bool)
    expected[:5, :5] = torch.ones(5, 5, dtype=torch.bool).triu(1)
    expected[5:, 5:] = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert torch.equal(mask, expected)
    assert torch.equal(blocks[1][2][0, 0], torch.ones(697, 697, dtype=torch.bool).triu(1))  # a long row alone
