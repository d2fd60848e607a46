"""Which implementation runs an op: "auto" (the CUDA kernels for CUDA tensors when they can launch there, else
chunked torch), "torch" (chunked torch), "cuda" (the CUDA kernels), "host_kernel" (the CUDA source built for the CPU,
tests only).

"auto" on CUDA tensors whose kernels cannot launch (library not built, no or too old a driver, no kernel image for
the GPU: kernel_library.launch_problem) runs torch and says why in one RuntimeWarning per process; "cuda" raises
instead."""

from __future__ import annotations

import warnings

import torch

from .kernel_library import KernelBackend, launch_problem
from .torch_chunked import DEFAULT_CHUNK_BYTES, TorchChunkedBackend

IMPLEMENTATIONS = ("auto", "torch", "cuda", "host_kernel")
_fallback_warned = False


def _warn_fallback(reason: str) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"fused ops: implementation='auto' runs the torch path on CUDA tensors: {reason}",
                      RuntimeWarning, stacklevel=3)


def select_backend(implementation: str, device: torch.device, chunk_bytes: int | None = None):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; expected one of: {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        implementation = "torch"
        if device.type == "cuda":
            problem = launch_problem(device)
            if problem is None:
                implementation = "cuda"
            else:
                _warn_fallback(problem)
    if implementation == "torch":
        return TorchChunkedBackend(DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    wanted = "cuda" if implementation == "cuda" else "cpu"
    if device.type != wanted:
        raise ValueError(f"implementation {implementation!r} needs {wanted} tensors, got tensors on {device}")
    return KernelBackend(implementation)
