"""Diagnostics of a policy-loss call, returned as a flat dict of floats with the names documented in METRICS, and
the one reducer that combines them over micro-batches, updates and ranks.

All statistics are computed without grad as 0-dim tensors and converted with a single `.tolist()`, so a call costs one
device synchronisation however many metrics it reports.

Each metric declares how several values of it combine (its `reduce`), so no caller guesses from a name:
  sum         counts
  min / max   extremes (the smallest gate weight of a step is the smallest of its micro-batches', not their mean)
  token_mean  means over tokens, weighted by each part's count/tokens
  seq_mean    means over sequences, weighted by each part's count/seqs
  mean        plain mean of the parts (values that are not per token or per sequence)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .masking import masked_row_mean

REDUCTIONS = ("sum", "min", "max", "token_mean", "seq_mean", "mean")


@dataclass(frozen=True)
class Metric:
    reduce: str  # one of REDUCTIONS
    doc: str

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduce!r}; choose from {REDUCTIONS}")


METRICS = {
    "count/tokens": Metric("sum", "response tokens in the batch (mask = 1)"),
    "count/seqs": Metric("sum", "sequences with at least one response token"),
    "ratio/mean": Metric("token_mean", "mean token importance ratio r = exp(logp - old_logp)"),
    "ratio/min": Metric("min", "smallest token ratio"),
    "ratio/max": Metric("max", "largest token ratio"),
    "kl/k3": Metric("token_mean", "k3 estimate of KL(old || new): mean over tokens of r - 1 - log r"),
    "entropy/sampled_nll": Metric("token_mean", "mean over tokens of -old_log_prob: the sampled tokens' negative "
                                  "log-likelihood under the policy that made them (temperature included), a Monte "
                                  "Carlo estimate of its per-token entropy; a fall towards 0 is entropy collapse"),
    "seq/log_ratio_var_mean": Metric("seq_mean", "mean over sequences of Var_i, the population variance of log r "
                                     "within sequence i"),
    "seq/gate_gap_mean": Metric("seq_mean", "SAPO losses: mean over sequences of the paper's D_i = |mean_t "
                                "sech^2(tau log r_t / 2) - sech^2(tau log s_i / 2)|, s_i = exp(mean_t log r_t), tau "
                                "from the sign of the sequence's advantage"),
    "seq/gate_gap_bound_mean": Metric("seq_mean", "SAPO losses: mean over sequences of the bound tau^2 Var_i / 4"),
    "seq/gate_gap_within_bound_frac": Metric("seq_mean", "SAPO losses: fraction of sequences with D_i <= tau^2 Var_i"
                                             " / 4 (1 by Jensen's inequality; less flags a numerical problem)"),
    "gate/weight_mean": Metric("token_mean", "SAPO losses: mean gate weight w = sech^2(tau (r - 1) / 2) over tokens "
                               "(r = s_i for sapo_seq)"),
    "gate/weight_min": Metric("min", "SAPO losses: smallest gate weight"),
    "gate/weight_below_half_frac": Metric("token_mean", "SAPO losses: fraction of tokens whose gate weight is below "
                                          "0.5"),
    "clip/frac": Metric("token_mean", "fraction of tokens whose loss the clip changed (0 for the SAPO losses, which "
                        "never clip)"),
    "clip/low_frac": Metric("token_mean", "fraction of tokens clipped at 1 - eps_low (grpo, gspo: A < 0 side; cispo:"
                            " any token)"),
    "clip/high_frac": Metric("token_mean", "fraction of tokens clipped at 1 + eps_high (grpo, gspo: A > 0 side; "
                             "cispo: any token)"),
    "clip/dual_frac": Metric("token_mean", "grpo: fraction of tokens whose loss the dual clip capped at -A * "
                             "clip_ratio_c"),
    "mismatch/k3": Metric("token_mean", "with rollout_log_probs: k3 estimate of KL(rollout || old), w = exp(old - "
                          "rollout): mean w - 1 - log w"),
    "mismatch/abs_diff_mean": Metric("token_mean", "with rollout_log_probs: mean over tokens of |old_logp - "
                                     "rollout_logp|, the rollout engine's log-prob error against the trainer's"),
    "mismatch/abs_diff_max": Metric("max", "with rollout_log_probs: largest |old_logp - rollout_logp| (a weight sync"
                                    " that did not take effect shows here first)"),
    "mismatch/weight_mean": Metric("token_mean", "with a rollout correction: mean of the applied correction weights"),
    "mismatch/changed_frac": Metric("token_mean", "with a rollout correction: fraction of tokens it truncated (tis) "
                                    "or masked out (mis)"),
}


def metric_reduction(name: str) -> str:
    """The declared reduction of a loss-library metric; an undeclared name is an error, never a guess."""
    if name not in METRICS:
        raise KeyError(f"metric {name!r} declares no reduction (not in losses.METRICS)")
    return METRICS[name].reduce


def reduce_metrics(parts: Iterable[dict[str, float]],
                   reduction_of: Callable[[str], str] = metric_reduction) -> dict[str, float]:
    """Combine several metric dicts (micro-batches, updates or ranks) into one, each key by its declared reduction.
    A key missing from some parts is reduced over the parts that have it; token_mean / seq_mean weigh each part by
    its count/tokens / count/seqs (a part without that count weighs 1)."""
    parts = list(parts)
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        present = [p for p in parts if key in p]
        values = [p[key] for p in present]
        how = reduction_of(key)
        if how == "sum":
            out[key] = sum(values)
        elif how == "min":
            out[key] = min(values)
        elif how == "max":
            out[key] = max(values)
        elif how == "mean":
            out[key] = sum(values) / len(values)
        elif how in ("token_mean", "seq_mean"):
            count = "count/tokens" if how == "token_mean" else "count/seqs"
            weights = [p.get(count, 1.0) for p in present]
            total = sum(weights)
            out[key] = sum(v * w for v, w in zip(values, weights)) / total if total else sum(values) / len(values)
        else:
            raise ValueError(f"metric {key!r}: unknown reduction {how!r}; choose from {REDUCTIONS}")
    return out


def sequence_log_ratio_variance(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of log r over each row's response tokens [B] (0 for rows of one or no token)."""
    centred = log_ratio - masked_row_mean(log_ratio, mask)[:, None]
    return masked_row_mean(centred * centred, mask)


def _sech2(x: torch.Tensor) -> torch.Tensor:
    return torch.cosh(x).reciprocal().square()


def sequence_gate_gap(log_ratio: torch.Tensor, mask: torch.Tensor, seq_tau: torch.Tensor,
                      seq_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence [B]: D_i = |mean_t sech^2(tau log r_t / 2) - sech^2(tau mean_t log r_t / 2)| (the mean token gate
    against the gate of the sequence's geometric-mean ratio) and its bound tau^2 Var_i / 4."""
    token_gate_mean = masked_row_mean(_sech2(seq_tau[:, None] * log_ratio / 2), mask)
    seq_gate = _sech2(seq_tau * masked_row_mean(log_ratio, mask) / 2)
    return (token_gate_mean - seq_gate).abs(), seq_tau * seq_tau * seq_var / 4


def gate_gap_stats(
    log_ratio: torch.Tensor, mask: torch.Tensor, seq_tau: torch.Tensor, seq_var: torch.Tensor, has_tokens: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The paper's section-4.1 check that the mean token gate tracks a sequence gate: D_i <= tau^2 Var_i / 4."""
    gap, bound = sequence_gate_gap(log_ratio, mask, seq_tau, seq_var)
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
