"""Grouping a stream of named tensors into buckets of bounded bytes: the unit in which weights leave the trainer
(policy/hf_stream.py) and travel to SGLang (rollout/weight_sync.py)."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive runs of tensors of one dtype, at most `bucket_bytes` each (a larger tensor travels alone), in the
    order given; a generator is consumed as the buckets are. One dtype per bucket keeps every tensor's byte offset
    aligned when a bucket travels as one flat byte buffer (SGLang's flattened receive)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes!r}")
    bucket, size = [], 0
    for name, tensor in named_tensors:
        if bucket and (tensor.dtype != bucket[0][1].dtype or size + nbytes(tensor) > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes(tensor)
    if bucket:
        yield bucket
