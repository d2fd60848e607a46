"""ctypes binding of the fused kernels' C ABI (kernels/sapo_kernels.h), for both builds of the one CUDA source:

  "cuda"         kernels/build/libsapo_kernels_cuda.so, CUDA tensors, launched on torch's current stream
  "host_kernel"  kernels/build/libsapo_kernels_host.so, CPU tensors: the same kernels executed on CPU threads
                 through kernels/host/cuda_on_cpu.h (slow; it exists so that the CUDA source is tested here)

`make kernels` builds both. SAPO_KERNELS_DIR overrides the folder the libraries are loaded from.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import torch

from .row_stats import RowStats

ABI_VERSION = 1
LIBRARIES = {"cuda": "libsapo_kernels_cuda.so", "host_kernel": "libsapo_kernels_host.so"}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ERRORS = {-1: "unsupported dtype", -2: "bad shape", -3: "a required pointer is NULL", -4: "bad loss parameters"}
LOSS_KINDS = {"sapo": 1, "grpo": 2}


class LossParams(ctypes.Structure):
    _fields_ = [
        ("loss_kind", ctypes.c_int32),
        ("tau_pos", ctypes.c_float),
        ("tau_neg", ctypes.c_float),
        ("ratio_low", ctypes.c_float),
        ("ratio_high", ctypes.c_float),
        ("clip_c", ctypes.c_float),
        ("log_ratio_clamp", ctypes.c_float),
    ]


def kernels_dir() -> Path:
    env = os.environ.get("SAPO_KERNELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "kernels" / "build"


class KernelLibraryError(RuntimeError):
    pass


_P, _I32, _I64, _F = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "sapo_abi_version": [],
    "sapo_logprob_stats": [_P, _I32, _I64, _I64, _I64, _P, _I64, _F, _P, _P, _P, _P, _P],
    "sapo_fused_forward": [_P, _I32, _I64, _I64, _I64, _P, _F, _P, _P, _P, LossParams, _P, _P, _P, _P, _P, _P],
    "sapo_logprob_backward": [_P, _I32, _I64, _I64, _I64, _P, _I64, _F, _P, _P, _P, _P, _P, _I64, _P],
}


@lru_cache(maxsize=None)
def load_library(kind: str) -> ctypes.CDLL:
    """Load and check one build; KernelLibraryError (with the fix) if it is missing or of another ABI."""
    path = kernels_dir() / LIBRARIES[kind]
    if not path.exists():
        raise KernelLibraryError(f"{path} is not built: run `make kernels` (or set SAPO_KERNELS_DIR)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise KernelLibraryError(f"cannot load {path}: {err}") from err
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    if lib.sapo_abi_version() != ABI_VERSION:
        raise KernelLibraryError(f"{path} has ABI {lib.sapo_abi_version()}, expected {ABI_VERSION}: rebuild it")
    return lib


def is_available(kind: str) -> bool:
    try:
        load_library(kind)
    except KernelLibraryError:
        return False
    return True


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class KernelBackend:
    """Runs the row statistics, the fused single-rank forward and the backward through one kernel library."""

    has_fused_loss = True

    def __init__(self, kind: str):
        self.name = kind
        self.lib = load_library(kind)

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            reason = _ERRORS.get(code, f"CUDA error {code}")
            raise KernelLibraryError(f"{what} failed in {LIBRARIES[self.name]}: {reason}")

    def _stream(self, t: torch.Tensor):
        return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream) if t.is_cuda else None

    def _new(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, dtype=torch.float32, device=like.device)

    def stats(self, logits, targets, vocab_start, inv_temperature, with_entropy) -> RowStats:
        n, vocab = logits.shape
        row_max, row_sumexp, target_z = self._new(n, logits), self._new(n, logits), self._new(n, logits)
        row_zexp = self._new(n, logits) if with_entropy else None
        code = self.lib.sapo_logprob_stats(
            _ptr(logits), _DTYPES[logits.dtype], n, vocab, logits.stride(0), _ptr(targets), vocab_start,
            inv_temperature, _ptr(row_max), _ptr(row_sumexp), _ptr(row_zexp), _ptr(target_z), self._stream(logits),
        )
        self._check(code, "sapo_logprob_stats")
        return RowStats(row_max, row_sumexp, row_zexp, target_z)

    def fused_forward(self, logits, targets, inv_temperature, old_logp, advantages, weights, params: LossParams):
        """(logp, lse, weighted token loss, weighted d loss / d logp), each float32 [n]."""
        n, vocab = logits.shape
        logp, lse, loss, grad = (self._new(n, logits) for _ in range(4))
        code = self.lib.sapo_fused_forward(
            _ptr(logits), _DTYPES[logits.dtype], n, vocab, logits.stride(0), _ptr(targets), inv_temperature,
            _ptr(old_logp), _ptr(advantages), _ptr(weights), params, _ptr(logp), _ptr(lse), None, _ptr(loss),
            _ptr(grad), self._stream(logits),
        )
        self._check(code, "sapo_fused_forward")
        return logp, lse, loss, grad

    def backward(self, logits, targets, vocab_start, inv_temperature, lse, grad_logp, grad_entropy, entropy, out):
        n, vocab = logits.shape
        grad_logp = grad_logp.to(torch.float32).contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(torch.float32).contiguous()
        code = self.lib.sapo_logprob_backward(
            _ptr(logits), _DTYPES[logits.dtype], n, vocab, logits.stride(0), _ptr(targets), vocab_start,
            inv_temperature, _ptr(lse), _ptr(grad_logp), _ptr(grad_entropy), _ptr(entropy), _ptr(out),
            out.stride(0), self._stream(logits),
        )
        self._check(code, "sapo_logprob_backward")
        return out
