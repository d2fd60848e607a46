"""fused_logprobs: per-token log-probs (and optionally entropy) from vocab-sharded logits, without ever holding an
fp32 [tokens, vocab] tensor, differentiable, tensor-parallel across `process_group`.

Cost per call: the backend's pass over the logits (one read), 2 collectives when the vocab is sharded, 2 small
device synchronisations for the input checks; the backward reads the logits once more and writes the gradient in
the logits' dtype (into the logits buffer itself with inplace_backward=True).
"""

from __future__ import annotations

import torch

from .backends import select_backend
from .row_stats import check_rows, finalize, group_size, merge_row_stats
from .validation import check_logits, check_targets, check_temperature, check_vocab_start


def log_probs_from_stats(stats, targets, vocab_start, vocab_local, group, vocab_hint):
    """Merge shard statistics across the group, finalize and check: (logp, lse, entropy or None, merged stats)."""
    local = targets - vocab_start
    owned = (targets >= 0) & (local >= 0) & (local < vocab_local)
    merged, owners = merge_row_stats(stats, owned, group)
    ignored = targets < 0
    logp, lse, entropy = finalize(merged, ignored)
    check_rows(logp, owners, ignored, vocab_hint)
    return logp, lse, entropy, merged


def shard_log_probs(backend, logits, targets, vocab_start, inv_temperature, group, with_entropy, vocab_hint):
    """Forward of the log-prob op on 2-D rows: (logp, lse, entropy or None), all float32 [n], checked."""
    if logits.shape[0] == 0:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, empty, (empty if with_entropy else None)
    stats = backend.stats(logits, targets, vocab_start, inv_temperature, with_entropy)
    return log_probs_from_stats(stats, targets, vocab_start, logits.shape[1], group, vocab_hint)[:3]


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, backend, vocab_start, inv_temperature, group, with_entropy, inplace, hint):
        logp, lse, entropy = shard_log_probs(backend, logits, targets, vocab_start, inv_temperature, group,
                                             with_entropy, hint)
        ctx.backend, ctx.vocab_start, ctx.inv_temperature, ctx.inplace = backend, vocab_start, inv_temperature, inplace
        ctx.save_for_backward(logits, targets, lse, entropy)
        if entropy is None:
            return logp, torch.zeros_like(logp)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        if entropy is None:
            grad_entropy = None
        out = logits if ctx.inplace else torch.empty_like(logits)
        if logits.shape[0]:
            ctx.backend.backward(logits, targets, ctx.vocab_start, ctx.inv_temperature, lse, grad_logp,
                                 grad_entropy, entropy, out)
        return out, None, None, None, None, None, None, None, None


def fused_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    process_group=None,
    vocab_start: int = 0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    implementation: str = "auto",
    inplace_backward: bool = False,
    chunk_bytes: int | None = None,
):
    """Log-probs [...] (float32) of `targets` [...] (global token ids) under softmax(logits / temperature).

    logits [..., V_local] (fp32, bf16 or fp16) is this rank's vocab shard, starting at global id `vocab_start`;
    with `process_group` the shards of all ranks form the vocab. Rows whose target is `ignore_index` get log-prob 0
    and no gradient. With return_entropy, returns (log_probs, entropy), both differentiable.
    inplace_backward writes d loss / d logits into the logits buffer (saves one logits-sized allocation; the logits
    must not be needed afterwards). chunk_bytes bounds the torch path's working memory.
    """
    inv_temperature = check_temperature(temperature)
    check_vocab_start(vocab_start)
    rows = check_logits(logits)
    flat_targets = check_targets(targets, logits.shape[:-1], logits.device, ignore_index)
    backend = select_backend(implementation, logits.device, chunk_bytes)
    hint = vocab_hint(rows.shape[1], vocab_start, process_group)
    logp, entropy = _LogProbs.apply(rows, flat_targets, backend, vocab_start, inv_temperature, process_group,
                                    return_entropy, inplace_backward, hint)
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if return_entropy else logp


def vocab_hint(vocab_local: int, vocab_start: int, group) -> str:
    """How an out-of-range error names the vocab: this rank's range, or the group's shards."""
    if group_size(group) == 1:
        return f"[{vocab_start}, {vocab_start + vocab_local})"
    return f"shards of {group_size(group)} ranks"
