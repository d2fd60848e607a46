"""The policy losses: SAPO (the product's default), GSPO and the GRPO family, from per-token log-probs.

Every loss type builds a per-token loss [B, T]; an optional rollout-mismatch weight multiplies it; the aggregation
mode turns it into a scalar. The SAPO losses never clip (their clip fractions are 0); the others clip as defined
in ../shared/ALGORITHM.md:

  sapo        -f(r_t) A,  f(r) = sigmoid(tau (r - 1)) 4 / tau, tau = tau_pos if A > 0 else tau_neg
  sapo_seq    the same gate on the sequence ratio s_i = exp(mean_t log r_t), in token form: value s_i, gradient
              s_i grad log p_t (section 4.1 of the paper: SAPO as a continuous GSPO)
  gspo        max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)) per sequence; A_i = the sequence's mean
              token advantage; the sequence loss stands on each of its tokens
  gspo_token  max(-A s_t, -A clip(s_t, ...)) with log s_t = log p_t - sg(log p_t) + sg(mean_t log r_t): value s_i,
              gradient s_i grad log p_t, so each token may carry its own advantage
  grpo        PPO clip max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) with separate eps (DAPO clip-higher) and,
              for A < 0, the dual clip min(., -A c)
  cispo       -A sg(clip(r, 1 - eps_low, 1 + eps_high)) log p  (the clipped ratio is a weight, not a gate)

Log-ratios are clamped to [-log_ratio_clamp, log_ratio_clamp] before exp. The loss is computed in at least fp32
whatever the input dtype.
"""

from __future__ import annotations

import dataclasses

import torch

from .aggregation import token_weights
from .config import LossConfig, check_positive
from .corrections import rollout_correction_weights
from .gates import sapo_gate, sapo_gate_weight, select_tau
from .masking import (
    masked_fraction,
    masked_row_mean,
    masked_row_sum,
    masked_token_max,
    masked_token_mean,
    masked_token_min,
)
from .metrics import gate_gap_stats, sequence_log_ratio_variance, to_floats
from .validation import check_policy_inputs

_LOSS_OPTIONS = tuple(f.name for f in dataclasses.fields(LossConfig))

# Loss types whose per-token loss and gradient depend only on that token (the others use sequence means).
TOKEN_LOCAL_LOSS_TYPES = ("sapo", "grpo", "cispo")


def make_loss_config(config: LossConfig | None = None, **options) -> LossConfig:
    """`config` (or the defaults) with `options` replacing its fields; an unknown option is a ValueError."""
    unknown = sorted(set(options) - set(_LOSS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown loss option(s) {unknown}; expected some of: {', '.join(_LOSS_OPTIONS)}")
    return dataclasses.replace(config or LossConfig(), **options)


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: LossConfig | None = None,
    rollout_log_probs: torch.Tensor | None = None,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
    compute_metrics: bool = True,
    **options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy loss (to minimise) and its metrics.

    log_probs [B, T] under the policy being trained (differentiable); old_log_probs [B, T] under the policy that the
    update starts from, and rollout_log_probs [B, T] from the rollout engine (both treated as constants);
    advantages [B] per sequence or [B, T] per token; response_mask [B, T] bool or 0/1.

    Options (keywords, or fields of `config`; see LossConfig): loss_type ("sapo", "sapo_seq", "gspo", "gspo_token",
    "grpo", "cispo"), loss_agg_mode ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
    "seq-mean-token-sum-norm"), tau_pos, tau_neg, clip_eps_low / clip_eps_high (None: the loss type's default),
    clip_ratio_c (grpo dual clip, None disables), rollout_correction (None, "tis", "mis"), rollout_correction_level
    ("token", "sequence", "geometric"), rollout_tis_cap, rollout_mis_low, rollout_mis_high, loss_norm_length,
    log_ratio_clamp.

    total_tokens / total_seqs: the normaliser counts of the whole batch when this call sees one micro-batch, so that
    micro-batch losses sum to the full-batch loss. Metrics (names in losses.metrics.METRICS) are floats of this call.
    """
    cfg = make_loss_config(config, **options)
    for name, value in (("total_tokens", total_tokens), ("total_seqs", total_seqs)):
        if value is not None:
            check_positive(name, value)
    mask, adv = check_policy_inputs(log_probs, old_log_probs, advantages, response_mask, rollout_log_probs)
    if cfg.rollout_correction is not None and rollout_log_probs is None:
        raise ValueError(f"rollout_correction={cfg.rollout_correction!r} needs rollout_log_probs")

    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=log_probs.device)
    logp = torch.where(mask, log_probs.to(dtype), zero)
    old = torch.where(mask, old_log_probs.detach().to(dtype), zero)
    adv = torch.where(mask, adv.detach().to(dtype), zero)
    rollout = None if rollout_log_probs is None else rollout_log_probs.detach().to(dtype)

    stats: dict[str, torch.Tensor] = {}
    loss_mat = token_losses(cfg, logp, old, adv, mask, stats)
    weights = loss_weights(cfg, mask, old, rollout, total_tokens=total_tokens, total_seqs=total_seqs, stats=stats)
    loss = masked_row_sum(loss_mat * weights, mask).sum()
    if not compute_metrics:
        return loss, {}
    log_ratio = (logp.detach() - old).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    stats["entropy/sampled_nll"] = -old
    return loss, _metrics(cfg, log_ratio, adv, mask, stats)


def token_losses(
    cfg: LossConfig,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    stats: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Unweighted per-token losses [B, T] of `cfg.loss_type` from already checked, masked [B, T] tensors (old log-probs
    and advantages detached). Token statistics for the metrics go into `stats` when given.

    For the types in TOKEN_LOCAL_LOSS_TYPES a token's loss and gradient depend on that token alone, so the tensors may
    be any subset of tokens laid out as [N, 1] (the fused output-layer path computes them chunk by chunk)."""
    log_ratio = (log_probs - old_log_probs).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    return _LOSSES[cfg.loss_type](cfg, log_ratio, log_probs, advantages, mask, {} if stats is None else stats)


def loss_weights(
    cfg: LossConfig,
    mask: torch.Tensor,
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor | None,
    *,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
    stats: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Detached per-token weights [B, T] such that loss = sum over the mask of token_loss * weight: the aggregation
    mode's weights times the rollout correction's (rollout-mismatch statistics go into `stats` when given)."""
    stats = {} if stats is None else stats
    weights = token_weights(mask, cfg.loss_agg_mode, loss_norm_length=cfg.loss_norm_length,
                            total_tokens=total_tokens, total_seqs=total_seqs, dtype=old_log_probs.dtype)
    weights = weights.to(old_log_probs.device)
    if rollout_log_probs is None:
        return weights
    zero = torch.zeros((), dtype=old_log_probs.dtype, device=old_log_probs.device)
    if cfg.rollout_correction is not None:
        correction, changed = rollout_correction_weights(
            old_log_probs, rollout_log_probs, mask, mode=cfg.rollout_correction, level=cfg.rollout_correction_level,
            tis_cap=cfg.rollout_tis_cap, mis_low=cfg.rollout_mis_low, mis_high=cfg.rollout_mis_high,
        )
        weights = weights * correction
        stats["mismatch/weight_mean"] = correction
        stats["mismatch/changed_frac"] = changed
    log_w = torch.where(mask, old_log_probs - rollout_log_probs, zero)
    stats["mismatch/k3"] = torch.exp(log_w) - 1 - log_w
    stats["mismatch/abs_diff"] = log_w.abs()
    return weights


def _sapo(cfg, log_ratio, logp, adv, mask, stats):
    ratio = torch.exp(log_ratio)
    tau = select_tau(adv, cfg.tau_pos, cfg.tau_neg)
    stats["gate/weight"] = sapo_gate_weight(ratio.detach(), tau)
    return -sapo_gate(ratio, tau) * adv


def _sequence_token_log_ratio(log_ratio, mask):
    """log s_t = log r_t - sg(log r_t) + sg(mean_t log r_t): the value of the sequence ratio, a token's gradient."""
    seq_log_ratio = masked_row_mean(log_ratio.detach(), mask)[:, None]
    return log_ratio - log_ratio.detach() + seq_log_ratio


def _sapo_seq(cfg, log_ratio, logp, adv, mask, stats):
    return _sapo(cfg, _sequence_token_log_ratio(log_ratio, mask), logp, adv, mask, stats)


def _clipped_surrogate(ratio, adv, cfg, mask, stats):
    low, high = cfg.clip_eps
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
    with torch.no_grad():
        r = ratio.detach()
        stats["clip/frac"] = clipped > unclipped
        stats["clip/low_frac"] = (adv < 0) & (r < 1.0 - low)
        stats["clip/high_frac"] = (adv > 0) & (r > 1.0 + high)
    return torch.maximum(unclipped, clipped)


def _gspo(cfg, log_ratio, logp, adv, mask, stats):
    seq_adv = masked_row_mean(adv, mask)[:, None]
    seq_ratio = torch.exp(masked_row_mean(log_ratio, mask))[:, None]
    return _clipped_surrogate(seq_ratio, seq_adv, cfg, mask, stats).expand_as(mask)


def _gspo_token(cfg, log_ratio, logp, adv, mask, stats):
    return _clipped_surrogate(torch.exp(_sequence_token_log_ratio(log_ratio, mask)), adv, cfg, mask, stats)


def _grpo(cfg, log_ratio, logp, adv, mask, stats):
    loss = _clipped_surrogate(torch.exp(log_ratio), adv, cfg, mask, stats)
    if cfg.clip_ratio_c is None:
        stats["clip/dual_frac"] = torch.zeros_like(mask)
        return loss
    cap = -adv * cfg.clip_ratio_c
    capped = (adv < 0) & (loss > cap)
    stats["clip/dual_frac"] = capped.detach()
    return torch.where(capped, cap, loss)


def _cispo(cfg, log_ratio, logp, adv, mask, stats):
    low, high = cfg.clip_eps
    ratio = torch.exp(log_ratio.detach())
    stats["clip/low_frac"] = ratio < 1.0 - low
    stats["clip/high_frac"] = ratio > 1.0 + high
    stats["clip/frac"] = stats["clip/low_frac"] | stats["clip/high_frac"]
    return -adv * ratio.clamp(1.0 - low, 1.0 + high) * logp


_LOSSES = {
    "sapo": _sapo,
    "sapo_seq": _sapo_seq,
    "gspo": _gspo,
    "gspo_token": _gspo_token,
    "grpo": _grpo,
    "cispo": _cispo,
}


@torch.no_grad()
def _metrics(cfg, log_ratio, adv, mask, token_stats) -> dict[str, float]:
    num_tokens = mask.sum().to(log_ratio.dtype)
    has_tokens = mask.any(dim=-1)
    num_seqs = has_tokens.sum().to(log_ratio.dtype)
    ratio = torch.exp(log_ratio)
    seq_var = sequence_log_ratio_variance(log_ratio, mask)
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    out = {
        "count/tokens": num_tokens,
        "count/seqs": num_seqs,
        "ratio/mean": masked_token_mean(ratio, mask, num_tokens),
        "ratio/min": masked_token_min(ratio, mask),
        "ratio/max": masked_token_max(ratio, mask),
        "kl/k3": masked_token_mean(ratio - 1 - log_ratio, mask, num_tokens),
        "seq/log_ratio_var_mean": torch.where(has_tokens, seq_var, zero).sum() / num_seqs,
    }
    if cfg.loss_type in ("sapo", "sapo_seq"):
        seq_tau = select_tau(masked_row_mean(adv, mask), cfg.tau_pos, cfg.tau_neg)
        out.update(gate_gap_stats(log_ratio, mask, seq_tau, seq_var, has_tokens))
        weight = token_stats.pop("gate/weight")
        out["gate/weight_mean"] = masked_token_mean(weight, mask, num_tokens)
        out["gate/weight_min"] = masked_token_min(weight, mask)
        out["gate/weight_below_half_frac"] = masked_fraction(weight < 0.5, mask, num_tokens)
        out["clip/frac"] = zero
    if "mismatch/abs_diff" in token_stats:
        abs_diff = token_stats.pop("mismatch/abs_diff")
        out["mismatch/abs_diff_mean"] = masked_token_mean(abs_diff, mask, num_tokens)
        out["mismatch/abs_diff_max"] = masked_token_max(abs_diff, mask)
    for key, value in token_stats.items():
        if value.dtype == torch.bool:
            out[key] = masked_fraction(value, mask, num_tokens)
        else:
            out[key] = masked_token_mean(value, mask, num_tokens)
    return to_floats(out)
