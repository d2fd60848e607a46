"""Diagnostics of a policy-loss call, returned as a flat dict of floats with the names documented in METRICS.

All statistics are computed without grad as 0-dim tensors and converted with a single `.tolist()`, so a call costs one
device synchronisation however many metrics it reports.
"""

from __future__ import annotations

import torch

from .masking import masked_row_mean

METRICS = {
    "count/tokens": "response tokens in the batch (mask = 1)",
    "count/seqs": "sequences with at least one response token",
    "ratio/mean": "mean token importance ratio r = exp(logp - old_logp)",
    "ratio/min": "smallest token ratio",
    "ratio/max": "largest token ratio",
    "kl/k3": "k3 estimate of KL(old || new): mean over tokens of r - 1 - log r",
    "seq/log_ratio_var_mean": "mean over sequences of Var_i, the population variance of log r within sequence i",
    "seq/gate_gap_mean": "SAPO losses: mean over sequences of the paper's D_i = |mean_t sech^2(tau log r_t / 2)"
    " - sech^2(tau log s_i / 2)|, s_i = exp(mean_t log r_t), tau from the sign of the sequence's advantage",
    "seq/gate_gap_bound_mean": "SAPO losses: mean over sequences of the bound tau^2 Var_i / 4",
    "seq/gate_gap_within_bound_frac": "SAPO losses: fraction of sequences with D_i <= tau^2 Var_i / 4 (1 by"
    " Jensen's inequality; less flags a numerical problem)",
    "gate/weight_mean": "SAPO losses: mean gate weight w = sech^2(tau (r - 1) / 2) over tokens (r = s_i for sapo_seq)",
    "gate/weight_min": "SAPO losses: smallest gate weight",
    "gate/weight_below_half_frac": "SAPO losses: fraction of tokens whose gate weight is below 0.5",
    "clip/frac": "fraction of tokens whose loss the clip changed (0 for the SAPO losses, which never clip)",
    "clip/low_frac": "fraction of tokens clipped at 1 - eps_low (grpo, gspo: A < 0 side; cispo: any token)",
    "clip/high_frac": "fraction of tokens clipped at 1 + eps_high (grpo, gspo: A > 0 side; cispo: any token)",
    "clip/dual_frac": "grpo: fraction of tokens whose loss the dual clip capped at -A * clip_ratio_c",
    "mismatch/k3": "with rollout_log_probs: k3 estimate of KL(rollout || old), w = exp(old - rollout): mean w - 1 - log w",
    "mismatch/weight_mean": "with a rollout correction: mean of the applied correction weights",
    "mismatch/changed_frac": "with a rollout correction: fraction of tokens it truncated (tis) or masked out (mis)",
}


def sequence_log_ratio_variance(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of log r over each row's response tokens [B] (0 for rows of one or no token)."""
    centred = log_ratio - masked_row_mean(log_ratio, mask)[:, None]
    return masked_row_mean(centred * centred, mask)


def _sech2(x: torch.Tensor) -> torch.Tensor:
    return torch.cosh(x).reciprocal().square()


def gate_gap_stats(
    log_ratio: torch.Tensor, mask: torch.Tensor, seq_tau: torch.Tensor, seq_var: torch.Tensor, has_tokens: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The paper's section-4.1 check that the mean token gate tracks a sequence gate: D_i <= tau^2 Var_i / 4."""
    tau = seq_tau[:, None]
    token_gate_mean = masked_row_mean(_sech2(tau * log_ratio / 2), mask)
    seq_gate = _sech2(seq_tau * masked_row_mean(log_ratio, mask) / 2)
    gap = (token_gate_mean - seq_gate).abs()
    bound = seq_tau * seq_tau * seq_var / 4
    num_seqs = has_tokens.sum()
    within = (gap <= bound + 1e-6) & has_tokens
    zero = torch.zeros((), dtype=gap.dtype, device=gap.device)
    return {
        "seq/gate_gap_mean": torch.where(has_tokens, gap, zero).sum() / num_seqs,
        "seq/gate_gap_bound_mean": torch.where(has_tokens, bound, zero).sum() / num_seqs,
        "seq/gate_gap_within_bound_frac": within.sum() / num_seqs,
    }


def to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Convert 0-dim tensors to floats with one synchronisation; names must be documented in METRICS."""
    unknown = set(stats) - set(METRICS)
    if unknown:
        raise KeyError(f"undocumented metric names: {sorted(unknown)}")
    if not stats:
        return {}
    values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in stats.values()]).tolist()
    return dict(zip(stats.keys(), values))
