"""Dynamic sampling (DAPO): a group whose rewards are all equal has zero group-normalised advantage and teaches
nothing, so it is dropped and the step tops up with groups from further prompts, up to a bounded number of rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Boolean [num_groups] for rewards [num_groups, samples_per_group]: True where the rewards are not all equal."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, samples_per_group], got shape {tuple(rewards.shape)}")
    return (rewards != rewards[:, :1]).any(dim=1)


def fill_groups(draw: Callable[[int], tuple[Sequence, torch.Tensor]], target: int, max_rounds: int):
    """Call draw(n) -> (groups, rewards [n, k]) until `target` informative groups are collected or `max_rounds` rounds
    are used. Returns (kept groups, their rewards [kept, k], stats). Each round asks for the groups still missing;
    when the rounds run out the step proceeds with fewer groups rather than none (stats say how many)."""
    kept, kept_rewards = [], []
    drawn = dropped = rounds = 0
    while len(kept) < target and rounds < max_rounds:
        groups, rewards = draw(target - len(kept))
        rounds += 1
        drawn += len(groups)
        mask = informative_groups(rewards)
        dropped += int((~mask).sum())
        for group, group_rewards, keep in zip(groups, rewards, mask.tolist()):
            if keep and len(kept) < target:
                kept.append(group)
                kept_rewards.append(group_rewards)
    rewards = torch.stack(kept_rewards) if kept_rewards else torch.empty(0, 0)
    stats = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/drawn_groups": drawn,
             "dynamic_sampling/dropped_groups": dropped, "dynamic_sampling/kept_groups": len(kept)}
    return kept, rewards, stats
