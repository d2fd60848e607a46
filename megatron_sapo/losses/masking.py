"""Reductions over the response mask. Positions outside the mask are selected away with torch.where, never
multiplied by zero, so that NaN or inf in padding cannot leak into a result or its gradient."""

from __future__ import annotations

import torch


def _fill(values: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(mask, values, torch.full((), fill, dtype=values.dtype, device=values.device))


def masked_row_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over each row's masked positions [B]."""
    return _fill(values, mask, 0.0).sum(dim=-1)


def masked_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's masked positions [B]; 0 for rows without any."""
    return masked_row_sum(values, mask) / mask.sum(dim=-1).clamp(min=1).to(values.dtype)


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    return _fill(values, mask, 0.0).sum() / num_tokens


def masked_token_min(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _fill(values, mask, float("inf")).min()


def masked_token_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _fill(values, mask, float("-inf")).max()


def masked_fraction(flags: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    return (flags & mask).sum() / num_tokens
