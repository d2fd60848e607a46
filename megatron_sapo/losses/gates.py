"""SAPO's soft gate on importance ratios, f(r) and its gradient weight w(r).

f(r) = sigmoid(tau (r - 1)) * 4 / tau replaces PPO's hard clip. Its derivative is
w(r) = 4 p (1 - p) = sech^2(tau (r - 1) / 2) with p = sigmoid(tau (r - 1)), so w(1) = 1 for every tau (the reason for
the 4 / tau factor) and the gradient fades smoothly as r leaves 1 instead of dropping to zero at a clip edge.
"""

from __future__ import annotations

import torch


def sapo_gate(ratio: torch.Tensor, tau) -> torch.Tensor:
    """f(r) = sigmoid(tau (r - 1)) * 4 / tau; tau is a float or a tensor broadcastable to ratio."""
    return torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)


def sapo_gate_weight(ratio: torch.Tensor, tau) -> torch.Tensor:
    """w(r) = d f / d r = 4 p (1 - p), the factor SAPO puts on the policy gradient r * grad log p.

    Written as 4 sigmoid(x) sigmoid(-x): 1 - p cancels catastrophically once p is near 1 (large r)."""
    x = tau * (ratio - 1.0)
    return 4.0 * torch.sigmoid(x) * torch.sigmoid(-x)


def select_tau(advantages: torch.Tensor, tau_pos: float, tau_neg: float) -> torch.Tensor:
    """tau_pos where A > 0, tau_neg elsewhere (A = 0 takes tau_neg; such tokens contribute nothing anyway)."""
    return torch.where(
        advantages > 0,
        torch.as_tensor(tau_pos, dtype=advantages.dtype, device=advantages.device),
        torch.as_tensor(tau_neg, dtype=advantages.dtype, device=advantages.device),
    )
