"""Checks on the inputs of the fused ops; every failure is a ValueError naming the argument and the problem."""

from __future__ import annotations

import math

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_temperature(temperature) -> float:
    """1 / temperature, after checking that temperature is a finite number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return 1.0 / float(temperature)


def check_vocab_start(vocab_start) -> None:
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an integer >= 0, got {vocab_start!r}")


def check_logits(logits: torch.Tensor) -> torch.Tensor:
    """A 2-D row view [n, V] of logits [..., V] (no copy), or a ValueError on dtype, shape or layout."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits dtype must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 2 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., vocab_shard] with a non-empty vocab, got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError(
            f"unsupported logits layout: the vocab dimension must be contiguous (stride 1), got strides "
            f"{tuple(logits.stride())}; call .contiguous() first"
        )
    try:
        return logits.view(-1, logits.shape[-1])
    except RuntimeError as err:
        raise ValueError(
            f"unsupported logits layout: shape {tuple(logits.shape)} with strides {tuple(logits.stride())} cannot be "
            "viewed as [rows, vocab] without a copy; call .contiguous() first"
        ) from err


def check_targets(targets: torch.Tensor, shape, device: torch.device, ignore_index: int | None,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Targets [...] flattened to [n] int64 with ignored rows (== ignore_index, or False in `valid`) as -1; any
    other negative id is an error."""
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if tuple(targets.shape) != tuple(shape):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match the expected {tuple(shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device} but the logits / hidden states are on {device}")
    flat = targets.reshape(-1).to(torch.int64)
    ignored = flat == ignore_index if ignore_index is not None else torch.zeros_like(flat, dtype=torch.bool)
    if valid is not None:
        ignored |= ~valid.reshape(-1)
    negative = (flat < 0) & ~ignored
    if negative.any():
        bad = negative.nonzero().flatten()[:5].tolist()
        raise ValueError(f"negative target ids at flattened rows {bad} (first 5); ignore_index is {ignore_index}")
    return torch.where(ignored, torch.full_like(flat, -1), flat)
