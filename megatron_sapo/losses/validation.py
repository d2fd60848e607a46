"""Checks on the tensors given to the policy loss. Each failure is a ValueError that names the argument and the
problem; the value checks (NaN/inf, mask values, an empty mask) share one device synchronisation."""

from __future__ import annotations

import torch


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_policy_inputs(
    log_probs: torch.Tensor | None,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_log_probs: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the inputs; return the mask as bool [B, T] and the advantages broadcast to [B, T].
    log_probs may be None (the fused ops compute them later); old_log_probs then sets the expected shape."""
    named = {"log_probs": log_probs, "old_log_probs": old_log_probs, "advantages": advantages,
             "response_mask": response_mask}
    if log_probs is None:
        del named["log_probs"]
        if not isinstance(old_log_probs, torch.Tensor):
            raise ValueError(f"old_log_probs must be a torch.Tensor, got {type(old_log_probs).__name__}")
        log_probs = old_log_probs
    if rollout_log_probs is not None:
        named["rollout_log_probs"] = rollout_log_probs
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if log_probs.dim() != 2:
        raise ValueError(f"{next(iter(named))} must be [batch, seq_len], got shape {_shape(log_probs)}")
    for name in ("old_log_probs", "response_mask", "rollout_log_probs"):
        if name in named and named[name].shape != log_probs.shape:
            raise ValueError(
                f"{name} shape {_shape(named[name])} does not match {next(iter(named))} shape {_shape(log_probs)}"
            )
    batch = log_probs.shape[0]
    if advantages.shape not in ((batch,), log_probs.shape):
        raise ValueError(
            f"advantages must be per sequence [{batch}] or per token {_shape(log_probs)}, "
            f"got shape {_shape(advantages)}"
        )
    for name, t in named.items():
        if name != "response_mask" and not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != log_probs.device:
            raise ValueError(f"{name} is on {t.device} but log_probs is on {log_probs.device}")
    if response_mask.is_complex():
        raise ValueError(f"response_mask must be bool or 0/1 numbers, got dtype {response_mask.dtype}")
    if log_probs.numel() == 0:
        raise ValueError(f"log_probs is empty (shape {_shape(log_probs)}): no response tokens")

    mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    adv = advantages[:, None].expand_as(log_probs) if advantages.dim() == 1 else advantages

    problems = {"response_mask has no response tokens (all zero)": ~mask.any()}
    if response_mask.dtype != torch.bool:
        problems["response_mask holds values other than 0 and 1"] = ((response_mask != 0) & (response_mask != 1)).any()
    for name, t in (("log_probs", log_probs.detach()), ("old_log_probs", old_log_probs),
                    ("rollout_log_probs", rollout_log_probs), ("advantages", adv)):
        if name in named:
            problems[f"{name} contains NaN or inf at response tokens"] = (~torch.isfinite(t) & mask).any()
    flags = torch.stack(list(problems.values())).tolist()
    for message, bad in zip(problems, flags):
        if bad:
            raise ValueError(message)
    return mask, adv
