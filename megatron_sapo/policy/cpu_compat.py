"""Everything Megatron-Core 0.16.1 needs to run without CUDA, in one place, applied only when CUDA is unavailable.

Measured on the CPU machines (../shared/ENVIRONMENT.md) and kept to what the policy uses. None of it runs on a GPU
machine: `enable()` returns at once when torch.cuda.is_available(), so nothing here can change GPU results.

  1. torch.cuda.current_device() is called for tensor placement by the MoE router and the attention workspace:
     it returns "cpu".
  2. megatron.core.transformer.moe.moe_utils.te_general_gemm is left undefined without TransformerEngine
     (NameError; a Megatron bug fixed in 0.19): set to None so the router uses torch.
  3. torch.cuda.synchronize() (dist-checkpoint save) and torch.cuda.Stream / current_stream (MoE dispatchers):
     a no-op and a stand-in stream.
  4. The pipeline schedules and FP32Optimizer create tensors with device="cuda" even at PP=1: `cuda_as_cpu()`
     is a TorchFunctionMode that maps device "cuda" to "cpu" for the duration of such calls.
The callers also configure Megatron for the CPU: use_cpu_initialization, an explicit boolean causal mask (the
default one is built on "cuda"), the allgather MoE dispatcher, batch_p2p_comm=False for gloo, and gradient clipping
done by megatron_sapo rather than Megatron's CUDA-only clip_grads.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


class _NullStream:
    """Enough of torch.cuda.Stream for Megatron's dispatchers to run on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def enable() -> bool:
    """Apply the adaptations once, if CUDA is unavailable; returns whether they are active."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Stream = _NullStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _enabled = True
    return True


class _CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_as_cpu():
    """Within the block, tensors asked for on "cuda" are made on the CPU (only when the adaptations are active)."""
    if not _enabled:
        yield
        return
    with _CudaAsCpu():
        yield
