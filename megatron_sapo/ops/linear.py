"""fused_linear_policy_loss: the policy loss straight from the last hidden states and the output layer's weight
shard, a chunk of tokens at a time, so that the [tokens, vocab] logits never exist (only [chunk, V_local]).

Per chunk: logits = hidden @ weight^T (in the hidden states' dtype, as the output layer would), the backend's row
statistics, the vocab-parallel merge (2 collectives per chunk when sharded), log-probs; then the gradient of the loss
with respect to them, the logits' gradient written over the chunk's logits, and dH = dlogits @ W,
dW += dlogits^T @ H. For the token-local losses (sapo, grpo, cispo) that all happens in the forward's single pass
(three matmuls per chunk, like the unfused forward + backward); the sequence losses (sapo_seq, gspo, gspo_token)
need every token's log-prob first, so they take a statistics pass, the loss, then a gradient pass that recomputes
each chunk's logits (four matmuls). The backward only scales the stored gradients by the incoming gradient.

With a process group: 1 collective to agree on the chunking, 2 per chunk, and dH all-reduced (1 collective) unless reduce_hidden_grad=False, for callers that
reduce it themselves (Megatron's tensor-parallel mappings). dW is accumulated in the weight's dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..losses import TOKEN_LOCAL_LOSS_TYPES, make_loss_config, token_losses
from ..losses.config import LossConfig
from .backends import select_backend
from .logprobs import log_probs_from_stats, shard_log_probs, vocab_hint
from .policy_loss import loss_metrics, prepare_loss_inputs
from .row_stats import group_size
from .torch_chunked import rows_per_chunk

# Larger than the logits path's chunks: each chunk re-reads and re-writes the whole dW accumulator, so fewer chunks
# are faster (measured on CPU at N=2048, V=151936, H=1024: 64 MiB 1.27x naive's time, 128 MiB 0.95x).
DEFAULT_LINEAR_CHUNK_BYTES = 128 * 1024 * 1024
from .validation import check_targets, check_temperature, check_vocab_start


def _loss_and_grad(cfg, logp, old, adv, mask, weights):
    """Weighted loss sum and its gradient with respect to logp, through the loss library."""
    with torch.enable_grad():
        leaf = logp.detach().requires_grad_()
        loss = torch.where(mask, token_losses(cfg, leaf, old, adv, mask) * weights, 0.0).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


class _LinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old, adv, mask, weights, cfg, backend, inv_temperature, group,
                vocab_start, chunk_rows, reduce_hidden_grad, hint):
        n = hidden.shape[0]
        shape = mask.shape
        flat = {name: t.reshape(-1) for name, t in (("old", old), ("adv", adv), ("mask", mask), ("w", weights))}
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        logp_all = hidden.new_zeros(n, dtype=torch.float32)
        lse_all = hidden.new_zeros(n, dtype=torch.float32)
        chunks = [slice(i, min(i + chunk_rows, n)) for i in range(0, n, chunk_rows)]

        in_buffer = hasattr(backend, "stats_inplace")

        def chunk_log_probs(rows):
            """(logp, lse, finish) of one chunk; finish(d loss / d logp) returns the chunk's d loss / d logits."""
            logits, chunk_targets = hidden[rows] @ weight.t(), targets[rows]
            if in_buffer:  # the torch backend works inside the chunk's own fp32 buffer
                buf = logits.float()
                local = backend.stats_inplace(buf, chunk_targets, vocab_start, inv_temperature)
                logp, lse, _, merged = log_probs_from_stats(local, chunk_targets, vocab_start, weight.shape[0],
                                                            group, hint)
                return logp, lse, lambda g: backend.grad_from_exp_inplace(
                    buf, chunk_targets, vocab_start, inv_temperature, local, merged, g)
            logp, lse, _ = shard_log_probs(backend, logits, chunk_targets, vocab_start, inv_temperature, group,
                                           False, hint)
            return logp, lse, lambda g: backend.backward(logits, chunk_targets, vocab_start, inv_temperature, lse, g,
                                                         None, None, logits)

        def backprop_chunk(rows, dlogits):
            dlogits = dlogits.to(weight.dtype)
            grad_hidden[rows] = dlogits @ weight
            grad_weight.addmm_(dlogits.t(), hidden[rows])

        token_local = cfg.loss_type in TOKEN_LOCAL_LOSS_TYPES
        loss = hidden.new_zeros((), dtype=torch.float32)
        for rows in chunks:
            logp, lse, finish = chunk_log_probs(rows)
            logp_all[rows], lse_all[rows] = logp, lse
            if token_local:
                part = {k: v[rows, None] for k, v in flat.items()}
                chunk_loss, grad = _loss_and_grad(cfg, logp[:, None], part["old"], part["adv"], part["mask"],
                                                  part["w"])
                loss += chunk_loss
                backprop_chunk(rows, finish(grad[:, 0]))
            del finish  # frees this chunk's logits before the next chunk's matmul allocates its own
        if not token_local:
            loss, grad = _loss_and_grad(cfg, logp_all.view(shape), old, adv, mask, weights)
            grad = grad.reshape(-1)
            for rows in chunks:
                logits = hidden[rows] @ weight.t()
                backprop_chunk(rows, backend.backward(logits, targets[rows], vocab_start, inv_temperature,
                                                      lse_all[rows], grad[rows], None, None, logits))
                del logits
        if reduce_hidden_grad and group_size(group) > 1:
            dist.all_reduce(grad_hidden, group=group)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(logp_all)
        return loss, logp_all

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp):
        grad_hidden, grad_weight = ctx.saved_tensors
        # the usual incoming gradient is exactly 1: hand over the stored gradients instead of a weight-sized copy
        if grad_loss.item() != 1.0:
            grad_hidden, grad_weight = grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(
                grad_weight.dtype)
        return (grad_hidden, grad_weight) + (None,) * 13


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    chunk_bytes: int | None = None,
    reduce_hidden_grad: bool = True,
    **options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics) as losses.policy_loss with log_probs from logits = hidden @ weight^T / temperature.

    hidden [B, T, H] (the last hidden states of the tokens that predict `targets`), weight [V_local, H] (this rank's
    output-layer shard, starting at vocab_start), targets [B, T] global ids. chunk_bytes bounds one chunk's fp32
    logits (default 128 MiB). Loss options as in losses.policy_loss.
    """
    cfg = make_loss_config(config, **options)
    inv_temperature = check_temperature(temperature)
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 3 or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"hidden must be [batch, seq_len, H] and weight [vocab_shard, H] with the same H, got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device}) must "
                         "share dtype and device")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocab shard (0 rows)")
    common = dict(config=cfg, rollout_log_probs=rollout_log_probs, total_tokens=total_tokens, total_seqs=total_seqs)
    inputs = prepare_loss_inputs(hidden, "hidden's", targets, old_log_probs, advantages, response_mask, vocab_start,
                                 **common)
    backend = select_backend(implementation, hidden.device, chunk_bytes)
    chunk_rows = _agreed_chunk_rows(weight, chunk_bytes, process_group, hidden.device)

    loss, logp = _LinearPolicyLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, inputs.targets, inputs.old, inputs.adv, inputs.mask,
        inputs.weights, cfg, backend, inv_temperature, process_group, vocab_start, chunk_rows, reduce_hidden_grad,
        vocab_hint(weight.shape[0], vocab_start, process_group),
    )
    return loss, loss_metrics(logp, old_log_probs, advantages, response_mask, **common)


@torch.no_grad()
def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          temperature: float = 1.0, process_group=None, vocab_start: int = 0,
                          ignore_index: int = -100, implementation: str = "auto",
                          chunk_bytes: int | None = None) -> torch.Tensor:
    """Log-probs [B, T] of `targets` under softmax(hidden @ weight^T / temperature), chunk by chunk, without grad:
    the old-policy and reference forwards of the output-layer path (same layout rules as fused_linear_policy_loss).
    """
    inv_temperature = check_temperature(temperature)
    if hidden.dim() != 3 or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"hidden must be [batch, seq_len, H] and weight [vocab_shard, H], got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    check_vocab_start(vocab_start)
    flat_targets = check_targets(targets, hidden.shape[:2], hidden.device, ignore_index)
    backend = select_backend(implementation, hidden.device, chunk_bytes)
    rows = hidden.reshape(-1, hidden.shape[-1])
    chunk_rows = _agreed_chunk_rows(weight, chunk_bytes, process_group, hidden.device)
    hint = vocab_hint(weight.shape[0], vocab_start, process_group)
    logp = rows.new_zeros(rows.shape[0], dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_rows):
        chunk = slice(start, min(start + chunk_rows, rows.shape[0]))
        logp[chunk] = shard_log_probs(backend, rows[chunk] @ weight.t(), flat_targets[chunk], vocab_start,
                                      inv_temperature, process_group, False, hint)[0]
    return logp.view(targets.shape)


def _agreed_chunk_rows(weight, chunk_bytes, group, device) -> int:
    """Rows per chunk, the same on every rank of the group (each chunk merges across ranks; shards may differ)."""
    chunk_rows = rows_per_chunk(weight.shape[0], DEFAULT_LINEAR_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    if group_size(group) > 1:
        agreed = torch.tensor([chunk_rows], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        chunk_rows = int(agreed.item())
    return chunk_rows
