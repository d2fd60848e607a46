"""The naive path, for tests and as the benchmarks' baseline: full-vocab logits, log_softmax, gather. It computes
in the input's precision but at least fp32 (bf16 / fp16 logits are upcast to fp32; float64 logits stay float64, so
the tests' float64 reference is one), and holds several [tokens, vocab] tensors of that precision, which is exactly
what the fused ops exist to avoid."""

from __future__ import annotations

import torch

from ..losses import policy_loss


def naive_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False):
    logp_all = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(targets >= 0, logp, 0.0)
    if not return_entropy:
        return logp
    entropy = -(torch.exp(logp_all) * torch.where(torch.isinf(logp_all), 0.0, logp_all)).sum(-1)
    return logp, torch.where(targets >= 0, entropy, 0.0)


def naive_policy_loss(logits, targets, old_log_probs, advantages, response_mask, *, temperature=1.0, **options):
    logp = naive_logprobs(logits, torch.where(response_mask.bool(), targets, -1), temperature=temperature)
    return policy_loss(logp, old_log_probs, advantages, response_mask, **options)


def naive_linear_policy_loss(hidden, weight, targets, old_log_probs, advantages, response_mask, **kwargs):
    return naive_policy_loss(hidden @ weight.t(), targets, old_log_probs, advantages, response_mask, **kwargs)
