"""Fused log-prob / importance-ratio / SAPO-gate ops from logits or from hidden states, vocab-parallel, with a
chunked torch implementation and the CUDA kernels of kernels/ behind one interface (see backends.py)."""

from .backends import IMPLEMENTATIONS
from .kernel_library import KernelLibraryError, is_available
from .linear import fused_linear_logprobs, fused_linear_policy_loss
from .logprobs import fused_logprobs
from .policy_loss import fused_policy_loss

__all__ = [
    "IMPLEMENTATIONS",
    "KernelLibraryError",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "fused_logprobs",
    "fused_policy_loss",
    "is_available",
]
