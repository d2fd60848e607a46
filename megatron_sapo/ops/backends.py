"""Which implementation runs an op: "auto" (CUDA kernels for CUDA tensors when built, else chunked torch),
"torch" (chunked torch), "cuda" (the CUDA kernels), "host_kernel" (the CUDA source built for the CPU, tests only)."""

from __future__ import annotations

import torch

from .kernel_library import KernelBackend, is_available
from .torch_chunked import DEFAULT_CHUNK_BYTES, TorchChunkedBackend

IMPLEMENTATIONS = ("auto", "torch", "cuda", "host_kernel")


def select_backend(implementation: str, device: torch.device, chunk_bytes: int | None = None):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; expected one of: {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        implementation = "cuda" if device.type == "cuda" and is_available("cuda") else "torch"
    if implementation == "torch":
        return TorchChunkedBackend(DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    wanted = "cuda" if implementation == "cuda" else "cpu"
    if device.type != wanted:
        raise ValueError(f"implementation {implementation!r} needs {wanted} tensors, got tensors on {device}")
    return KernelBackend(implementation)
