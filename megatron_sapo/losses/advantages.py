"""Group-relative advantage estimators: one scalar per response, from its reward and its group (prompt).

  grpo     A_i = (R_i - mean_g R) / (std_g R + eps), std unbiased (as torch.std); a group of one gets A = 0
  dr_grpo  A_i = R_i - mean_g R (Dr.GRPO: no division by the std); a group of one gets A = 0
  rloo     A_i = R_i - mean_{j != i in g} R_j = (n R_i - sum_g R) / (n - 1); needs at least two per group
"""

from __future__ import annotations

import torch

from .config import check_choice, check_non_negative

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def compute_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    estimator: str = "grpo",
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages [N] (float32 or wider) for rewards [N] whose prompt groups are given by integer labels [N].

    Labels need not be contiguous or sorted; responses with the same label form a group.
    """
    check_choice("advantage estimator", estimator, ADVANTAGE_ESTIMATORS)
    check_non_negative("eps", eps)
    rewards = torch.as_tensor(rewards)
    group_index = torch.as_tensor(group_index, device=rewards.device)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_responses], got shape {tuple(rewards.shape)}")
    if group_index.shape != rewards.shape:
        raise ValueError(
            f"group_index shape {tuple(group_index.shape)} does not match rewards shape {tuple(rewards.shape)}"
        )
    if group_index.dtype.is_floating_point or group_index.dtype == torch.bool or group_index.is_complex():
        raise ValueError(f"group_index must hold integer group labels, got dtype {group_index.dtype}")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: no responses to compute advantages for")
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"rewards contain NaN or inf (first positions: {bad})")

    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    n = counts.to(rewards.dtype)
    sums = torch.zeros_like(n).index_add_(0, inverse, rewards)
    n_i, sum_i = n[inverse], sums[inverse]

    if estimator == "rloo":
        if (counts < 2).any():
            singles = torch.unique(group_index[(counts < 2)[inverse]])[:5].tolist()
            raise ValueError(f"rloo needs at least 2 responses per group; groups of size 1: {singles}")
        return (n_i * rewards - sum_i) / (n_i - 1)

    centred = rewards - sum_i / n_i
    single = n_i < 2
    if estimator == "dr_grpo":
        return torch.where(single, torch.zeros_like(centred), centred)
    sq = torch.zeros_like(n).index_add_(0, inverse, centred * centred)
    std = torch.sqrt(sq / (n - 1).clamp(min=1))[inverse]
    return torch.where(single, torch.zeros_like(centred), centred / (std + eps))
