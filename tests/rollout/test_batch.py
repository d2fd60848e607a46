"""Completions -> the training batch, for the engine's MoE routes: aligned with input_ids (position t holds token t's
experts), -1 after the last fed token and in padding rows; completions with routes of the wrong length, or only
some completions with routes, are named errors."""

import pytest
import torch

from megatron_sapo.rollout.batch import collate
from megatron_sapo.rollout.engine import Completion


def _completion(prompt, output, routes):
    return Completion(prompt_ids=prompt, output_ids=output, output_logprobs=[-0.5] * len(output), text="",
                      finish_reason="stop", weight_version="0", routes=routes)


def test_routes_line_up_with_the_tokens():
    a = torch.arange(4 * 3 * 2, dtype=torch.int16).view(4, 3, 2)  # 2 prompt + 3 output tokens: 4 fed
    b = torch.arange(2 * 3 * 2, dtype=torch.int16).view(2, 3, 2) + 100  # 1 + 2 tokens: 2 fed
    batch = collate([_completion([5, 6], [7, 8, 9], a), _completion([5], [7, 8], b)], torch.zeros(2), 0)
    assert batch.routes.shape == (2, 5, 3, 2) and batch.routes.dtype == torch.int16
    assert torch.equal(batch.routes[0, :4], a) and (batch.routes[0, 4] == -1).all()
    assert torch.equal(batch.routes[1, :2], b) and (batch.routes[1, 2:] == -1).all()
    padded = batch.padded_to(4)
    assert padded.routes.shape == (4, 5, 3, 2) and (padded.routes[2:] == -1).all()
    assert torch.equal(padded.select(slice(0, 1)).routes, batch.routes[:1])
    assert collate([_completion([5], [7], None)], torch.zeros(1), 0).routes is None


def test_routes_that_do_not_fit_are_named():
    a = torch.zeros(4, 3, 2, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"completion 0: routes of shape \(4, 3, 2\), expected \(3, 3, 2\)"):
        collate([_completion([5], [7, 8, 9], a)], torch.zeros(1), 0)
    with pytest.raises(ValueError, match="1 of 2 completions came without MoE routes"):
        collate([_completion([5, 6], [7, 8, 9], a), _completion([5], [7], None)], torch.zeros(2), 0)
