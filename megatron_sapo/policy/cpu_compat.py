"""What Megatron-Core 0.16.1 needs where TransformerEngine or CUDA is missing, in one place, each adaptation keyed
on the condition that needs it (measured on the CPU machines, ../shared/ENVIRONMENT.md, and kept to what the policy
uses). `enable()` applies them once per process.

Needed whenever TransformerEngine is not used (no TE installed, or no CUDA for it), GPU or not:
  1. megatron.core.transformer.moe.moe_utils.te_general_gemm is left undefined without TransformerEngine, yet the
     router's gating reads it on every call (NameError on every MoE forward; a Megatron bug fixed in 0.19): set to
     None so the router uses torch.
  2. Megatron's WrappedTorchNorm (the norm of the local layer spec, used without TE / Apex) refuses sequence
     parallelism, which Megatron requires for MoE with TP in training: the same torch norm is built, its weight
     marked `sequence_parallel` so that finalize_model_grads all-reduces its gradient over TP, as TE's norms are.
Needed only without CUDA (none of these runs on a GPU machine, so nothing here can change GPU results):
  3. torch.cuda.current_device() is called for tensor placement by the MoE router and the attention workspace:
     it returns "cpu".
  4. torch.cuda.synchronize() (dist-checkpoint save) and torch.cuda.Stream / current_stream (MoE dispatchers):
     a no-op and a stand-in stream.
  5. The pipeline schedules and FP32Optimizer create tensors with device="cuda" even at PP=1: `cuda_as_cpu()`
     is a TorchFunctionMode that maps device "cuda" to "cpu" for the duration of such calls.
  6. Megatron's clip_grad_by_total_norm_fp32 asserts CUDA gradients: the optimizer gets a CPU version with the
     same arithmetic (scale every gradient by max_norm / (total_norm + 1e-6) when that is below 1).
  7. Activation recompute (tensor_parallel.random's checkpoint) saves and restores the CUDA generator's state
     around each recomputed forward: there is none, so an empty state is saved and nothing restored (Megatron
     saves and restores the CPU generator's state itself).
The callers also configure Megatron for the CPU: use_cpu_initialization, an explicit boolean causal mask (the
default one is built on "cuda"), the allgather MoE dispatcher and batch_p2p_comm=False for gloo.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.overrides import TorchFunctionMode

_without_te_applied = False
_without_cuda_applied = False


def transformer_engine_importable() -> bool:
    """Whether TransformerEngine imports here (its presence on disk is not enough: a broken build fails to import)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or an OSError / RuntimeError from a build that does not match the driver
        return False
    return True


def uses_transformer_engine() -> bool:
    """The model is built from TransformerEngine's layers: TE imports and CUDA is present (model.layer_spec)."""
    return torch.cuda.is_available() and transformer_engine_importable()


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
    """Apply, once, the adaptations for TransformerEngine missing (when it is not used) and for CUDA missing (when it
    is unavailable); returns whether the CUDA-missing ones are active (the caller then configures for the CPU)."""
    global _without_te_applied, _without_cuda_applied
    if not _without_te_applied and not uses_transformer_engine():
        _adapt_to_missing_transformer_engine()
        _without_te_applied = True
    if not _without_cuda_applied and not torch.cuda.is_available():
        _adapt_to_missing_cuda()
        _without_cuda_applied = True
    return _without_cuda_applied


def _adapt_to_missing_transformer_engine() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    from megatron.core.transformer import torch_norm

    torch_norm.WrappedTorchNorm.__new__ = _sequence_parallel_norm(torch_norm.WrappedTorchNorm.__new__)


def _adapt_to_missing_cuda() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Stream = _NullStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    from megatron.core.optimizer import optimizer as megatron_optimizer

    megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None


def _sequence_parallel_norm(original_new):
    def new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, *args, **kwargs)
        norm = original_new(cls, dataclasses.replace(config, sequence_parallel=False), hidden_size, eps, *args,
                            **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm
    return new


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            grad.mul_(clip_coeff)


class _CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_as_cpu():
    """Within the block, tensors asked for on "cuda" are made on the CPU (only when CUDA is missing)."""
    if not _without_cuda_applied:
        yield
        return
    with _CudaAsCpu():
        yield


@contextlib.contextmanager
def model_code():
    """Inside cuda_as_cpu(): the block runs without its mode. For the model's forward and the loss, which make their
    tensors on their inputs' device: the mode's Python hook costs every torch call about 3 us, a tenth of the tiny
    demo model's train step (only Megatron's schedules and optimizer ask for "cuda")."""
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if not isinstance(_get_current_function_mode(), _CudaAsCpu):
        yield
        return
    with _pop_mode_temporarily():
        yield
