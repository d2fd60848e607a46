import statistics

import pytest
import torch

from megatron_sapo.losses import compute_advantages

REWARDS = [1.0, 0.0, 1.0, 1.0, 0.5, 0.0, 0.2, 3.0]
GROUPS = [7, 7, 7, 7, -2, -2, 40, 40]  # non-contiguous labels, groups of 4, 2 and 2


def _by_group():
    groups = {}
    for i, g in enumerate(GROUPS):
        groups.setdefault(g, []).append(i)
    return groups


def test_grpo_matches_group_mean_and_unbiased_std():
    adv = compute_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), "grpo")
    for members in _by_group().values():
        rs = [REWARDS[i] for i in members]
        mean, std = statistics.mean(rs), statistics.stdev(rs)
        for i in members:
            assert adv[i].item() == pytest.approx((REWARDS[i] - mean) / (std + 1e-6), rel=1e-6)


def test_dr_grpo_does_not_divide_by_std():
    adv = compute_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), "dr_grpo")
    for members in _by_group().values():
        mean = statistics.mean(REWARDS[i] for i in members)
        for i in members:
            assert adv[i].item() == pytest.approx(REWARDS[i] - mean, abs=1e-6)


def test_rloo_is_reward_minus_mean_of_the_others():
    adv = compute_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), "rloo")
    for members in _by_group().values():
        for i in members:
            others = [REWARDS[j] for j in members if j != i]
            assert adv[i].item() == pytest.approx(REWARDS[i] - statistics.mean(others), abs=1e-6)


def test_equal_rewards_give_zero_advantage_and_singletons_zero():
    adv = compute_advantages(torch.tensor([0.5, 0.5, 0.5, 2.0]), torch.tensor([0, 0, 0, 1]), "grpo")
    assert torch.all(adv == 0)
    assert torch.all(compute_advantages(torch.tensor([3.0]), torch.tensor([0]), "dr_grpo") == 0)


@pytest.mark.parametrize(
    "rewards,groups,estimator,message",
    [
        ([1.0, 0.0, 2.0], [0, 0, 1], "rloo", "rloo needs at least 2 responses per group; groups of size 1: \\[1\\]"),
        ([1.0, float("nan")], [0, 0], "grpo", "rewards contain NaN"),
        ([1.0, 0.0], [0, 0], "ppo", "unknown advantage estimator 'ppo'"),
        ([1.0, 0.0], [0.0, 0.0], "grpo", "group_index must hold integer group labels"),
        ([1.0, 0.0], [0, 0, 0], "grpo", "group_index shape \\(3,\\) does not match rewards shape \\(2,\\)"),
        ([[1.0, 0.0]], [[0, 0]], "grpo", "rewards must be 1-D"),
        ([], [], "grpo", "rewards is empty"),
    ],
)
def test_bad_input_is_named(rewards, groups, estimator, message):
    group_dtype = torch.float32 if groups and isinstance(groups[0], float) else torch.int64
    with pytest.raises(ValueError, match=message):
        compute_advantages(torch.tensor(rewards), torch.tensor(groups, dtype=group_dtype), estimator)
