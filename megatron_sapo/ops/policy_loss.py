"""fused_policy_loss: the policy loss of megatron_sapo.losses computed from logits [B, T, V_local].

On a single rank with the kernel library, "sapo" and "grpo" run as one kernel pass per row (log-prob, ratio, gate
and weighted token loss, with d loss / d log-prob kept for the backward), and the backward is one more pass that
writes d loss / d logits = g_t (onehot - softmax) / T in the logits' dtype. Everywhere else (vocab-parallel,
other loss types, the torch path) the log-probs come from fused_logprobs and the loss from the library itself;
either way no fp32 [tokens, vocab] tensor exists and the result means exactly what losses.policy_loss means.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..losses import loss_weights, make_loss_config, policy_loss
from ..losses.config import LossConfig
from ..losses.validation import check_policy_inputs
from .backends import select_backend
from .kernel_library import LOSS_KINDS, LossParams
from .logprobs import fused_logprobs, vocab_hint
from .row_stats import check_rows, group_size
from .validation import check_logits, check_targets, check_temperature, check_vocab_start


def kernel_loss_params(cfg: LossConfig) -> LossParams:
    low, high = cfg.clip_eps
    return LossParams(
        loss_kind=LOSS_KINDS[cfg.loss_type], tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg, ratio_low=1.0 - low,
        ratio_high=1.0 + high, clip_c=cfg.clip_ratio_c or 0.0, log_ratio_clamp=cfg.log_ratio_clamp,
    )


class LossInputs(NamedTuple):
    """The per-token inputs of a fused loss, checked: fp32 [B, T] tensors zeroed outside the mask, and the flat
    targets with -1 at ignored positions."""

    mask: torch.Tensor
    targets: torch.Tensor
    old: torch.Tensor
    adv: torch.Tensor
    weights: torch.Tensor  # aggregation x rollout-correction weight of each token (losses.loss_weights)


def prepare_loss_inputs(source, source_name, targets, old_log_probs, advantages, response_mask, vocab_start, *,
                        config, rollout_log_probs, total_tokens, total_seqs) -> LossInputs:
    """Check the loss inputs against `source` (logits or hidden states, [B, T, ...]) and prepare them."""
    check_vocab_start(vocab_start)
    mask, adv = check_policy_inputs(None, old_log_probs, advantages, response_mask, rollout_log_probs)
    if old_log_probs.shape != source.shape[:2]:
        raise ValueError(f"old_log_probs shape {tuple(old_log_probs.shape)} does not match {source_name} "
                         f"[batch, seq_len] {tuple(source.shape[:2])}")
    flat_targets = check_targets(targets, source.shape[:2], source.device, None, valid=mask)
    old = torch.where(mask, old_log_probs.detach().float(), 0.0)
    rollout = None if rollout_log_probs is None else rollout_log_probs.detach().float()
    weights = loss_weights(config, mask, old, rollout, total_tokens=total_tokens, total_seqs=total_seqs)
    return LossInputs(mask, flat_targets, old, torch.where(mask, adv.detach().float(), 0.0), weights)


def loss_metrics(log_probs, old_log_probs, advantages, response_mask, **common) -> dict[str, float]:
    """The loss library's metrics for fused-computed log-probs (flat [B * T] or [B, T])."""
    with torch.no_grad():
        return policy_loss(log_probs.view(response_mask.shape), old_log_probs, advantages, response_mask,
                           **common)[1]


class _FusedKernelPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, old, adv, weights, backend, params, inv_temperature, inplace, hint):
        # targets are shard-local here; the kernel does not range-check them, check_rows does
        logp, lse, token_loss, grad_coeff = backend.fused_forward(logits, targets, inv_temperature, old, adv, weights,
                                                                  params)
        ignored = targets == -1
        owned = (targets >= 0) & (targets < logits.shape[1])
        check_rows(logp, owned.to(torch.float32), ignored, hint)
        ctx.backend, ctx.inv_temperature, ctx.inplace = backend, inv_temperature, inplace
        ctx.save_for_backward(logits, targets, lse, grad_coeff)
        ctx.mark_non_differentiable(logp)
        return token_loss.sum(), logp

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp):
        logits, targets, lse, grad_coeff = ctx.saved_tensors
        out = logits if ctx.inplace else torch.empty_like(logits)
        ctx.backend.backward(logits, targets, 0, ctx.inv_temperature, lse, grad_coeff * grad_loss, None, None, out)
        return out, None, None, None, None, None, None, None, None, None


def fused_policy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    process_group=None,
    vocab_start: int = 0,
    rollout_log_probs: torch.Tensor | None = None,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
    config: LossConfig | None = None,
    implementation: str = "auto",
    inplace_backward: bool = False,
    chunk_bytes: int | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics) as losses.policy_loss(log_probs, ...) with log_probs = log softmax(logits / T)[targets].

    logits [B, T, V_local] is this rank's vocab shard starting at `vocab_start`; targets [B, T] are global token ids
    (any value at positions outside response_mask). Loss options (loss_type, loss_agg_mode, tau_pos, tau_neg, clip
    eps, rollout_correction, ...) are those of losses.policy_loss, as keywords or `config`.
    """
    cfg = make_loss_config(config, **options)
    inv_temperature = check_temperature(temperature)
    rows = check_logits(logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq_len, vocab_shard], got shape {tuple(logits.shape)}")
    common = dict(config=cfg, rollout_log_probs=rollout_log_probs, total_tokens=total_tokens, total_seqs=total_seqs)
    inputs = prepare_loss_inputs(logits, "logits'", targets, old_log_probs, advantages, response_mask, vocab_start,
                                 **common)
    backend = select_backend(implementation, logits.device, chunk_bytes)

    if backend.has_fused_loss and cfg.loss_type in LOSS_KINDS and group_size(process_group) == 1:
        # a target below vocab_start becomes local id -2: not ignored (-1), reported as out of range
        local_targets = torch.where(inputs.targets >= 0, inputs.targets - vocab_start, -1)
        local_targets = torch.where(local_targets < -1, -2, local_targets)
        loss, logp = _FusedKernelPolicyLoss.apply(
            rows, local_targets, inputs.old.reshape(-1), inputs.adv.reshape(-1), inputs.weights.reshape(-1), backend,
            kernel_loss_params(cfg), inv_temperature, inplace_backward,
            vocab_hint(rows.shape[1], vocab_start, process_group),
        )
        return loss, loss_metrics(logp, old_log_probs, advantages, response_mask, **common)

    logp = fused_logprobs(logits, inputs.targets.view(inputs.mask.shape), temperature=temperature,
                          process_group=process_group, vocab_start=vocab_start, ignore_index=-1,
                          implementation=implementation, inplace_backward=inplace_backward, chunk_bytes=chunk_bytes)
    return policy_loss(logp, old_log_probs, advantages, response_mask, **common)
