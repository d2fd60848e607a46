"""Completions as training tensors: prompt + response token ids right-padded into [B, S], and everything else over
the S - 1 predicted positions (position t scores token t + 1), the policy's batch convention.

The engine's per-token log-probs become `rollout_log_probs` (for mismatch corrections and the mismatch metrics);
rows can be shuffled, split into mini-batches and padded with empty rows (no response token, so they weigh
nothing) to the multiple of data-parallel size x micro-batch size the policy needs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .engine import Completion


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, S] int64, right-padded
    response_mask: torch.Tensor  # [B, S-1] bool
    rollout_log_probs: torch.Tensor  # [B, S-1] float32, 0 outside the response
    advantages: torch.Tensor  # [B] float32
    # MoE routes of the engine, when asked for: [B, S, num_layers, k] int16 aligned with input_ids (position t: the
    # experts of token t), -1 where the engine has none (the last token, padding, layers without experts)
    routes: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor | slice) -> RolloutBatch:
        return RolloutBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                               for f in fields(self)})

    def padded_to(self, multiple: int) -> RolloutBatch:
        """The batch with empty rows appended until its row count is a multiple of `multiple` (no routes: -1)."""
        extra = -self.num_rows % multiple
        if not extra:
            return self
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            fill = -1 if f.name == "routes" else 0
            out[f.name] = None if t is None else torch.cat([t, t.new_full((extra, *t.shape[1:]), fill)])
        return RolloutBatch(**out)


def collate(completions: list[Completion], advantages: torch.Tensor, pad_id: int) -> RolloutBatch:
    if len(completions) != advantages.shape[0]:
        raise ValueError(f"{len(completions)} completions but {advantages.shape[0]} advantages")
    if not completions:
        raise ValueError("no completions to train on")
    seq_len = max(2, max(len(c.prompt_ids) + len(c.output_ids) for c in completions))
    rows = len(completions)
    input_ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, seq_len - 1, dtype=torch.bool)
    logprobs = torch.zeros(rows, seq_len - 1, dtype=torch.float32)
    for i, c in enumerate(completions):
        if len(c.output_logprobs) != len(c.output_ids):
            raise ValueError(f"completion {i} has {len(c.output_ids)} tokens but {len(c.output_logprobs)} log-probs")
        if not c.prompt_ids:
            raise ValueError(f"completion {i} has an empty prompt: the first response token has no context")
        start, end = len(c.prompt_ids), len(c.prompt_ids) + len(c.output_ids)
        input_ids[i, :end] = torch.tensor(c.prompt_ids + c.output_ids, dtype=torch.long)
        mask[i, start - 1:end - 1] = True
        logprobs[i, start - 1:end - 1] = torch.tensor(c.output_logprobs, dtype=torch.float32)
    return RolloutBatch(input_ids, mask, logprobs, advantages.to(torch.float32), _routes(completions, seq_len))


def _routes(completions: list[Completion], seq_len: int) -> torch.Tensor | None:
    """The completions' routes as [B, S, num_layers, k], -1 where there are none; None if no completion has any."""
    with_routes = [c.routes is not None for c in completions]
    if not any(with_routes):
        return None
    if not all(with_routes):
        raise ValueError(f"{with_routes.count(False)} of {len(completions)} completions came without MoE routes")
    first = completions[0].routes
    out = torch.full((len(completions), seq_len, *first.shape[1:]), -1, dtype=torch.int16)
    for i, c in enumerate(completions):
        fed = len(c.prompt_ids) + len(c.output_ids) - 1
        if tuple(c.routes.shape) != (fed, *first.shape[1:]):
            raise ValueError(f"completion {i}: routes of shape {tuple(c.routes.shape)}, expected "
                             f"{(fed, *first.shape[1:])} (one row per token fed through the model: all but the last)")
        out[i, :fed] = c.routes
    return out


def mini_batches(batch: RolloutBatch, count: int, *, generator: torch.Generator | None = None) -> list[RolloutBatch]:
    """`count` mini-batches of shuffled rows (sizes differ by at most one; the shuffle mixes prompt groups)."""
    if count > batch.num_rows:
        raise ValueError(f"{count} mini-batches need at least {count} rows, the rollout batch has {batch.num_rows}")
    order = torch.randperm(batch.num_rows, generator=generator)
    return [batch.select(part) for part in torch.tensor_split(order, count)]
