"""ctypes binding of the fused kernels' C ABI (kernels/sapo_kernels.h), for both builds of the one CUDA source:

  "cuda"         kernels/build/libsapo_kernels_cuda.so, CUDA tensors, launched on torch's current stream
  "host_kernel"  kernels/build/libsapo_kernels_host.so, CPU tensors: the same kernels executed on CPU threads
                 through kernels/host/cuda_on_cpu.h (slow; it exists so that the CUDA source is tested here)

`make kernels` builds both. SAPO_KERNELS_DIR overrides the folder the libraries are loaded from.

Each call runs under the logits' device guard, on torch's current stream of that device, after KernelBackend has
checked every tensor it passes by pointer (a layout the kernels would misread is refused with a ValueError, never
read). A failed call raises KernelLibraryError naming the function, the library and the error, e.g.
  sapo_fused_forward failed in libsapo_kernels_cuda.so: CUDA error 35 (cudaErrorInsufficientDriver: CUDA driver
  version is insufficient for CUDA runtime version)

SAPO_KERNELS_SYNC=1 is a debug mode: each call then synchronises the stream after its launch, so that a fault
while the kernel runs (an illegal address, ...) is reported by the call that launched it rather than by whichever
CUDA call comes next. It costs a host-device round trip per call; 0 or unset is the normal asynchronous mode.

launch_problem(device) says why the CUDA library cannot launch on a device (not built, another ABI, no driver, an
old driver, no kernel image for the GPU): implementation="auto" then falls back to torch (backends.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from functools import lru_cache
from pathlib import Path

import torch

from .row_stats import RowStats

ABI_VERSION = 2
LIBRARIES = {"cuda": "libsapo_kernels_cuda.so", "host_kernel": "libsapo_kernels_host.so"}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
LOSS_KINDS = {"sapo": 1, "grpo": 2}
SYNC_ENV = "SAPO_KERNELS_SYNC"


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
_SIGNATURES = {  # name: (argument types, return type)
    "sapo_abi_version": ([], ctypes.c_int),
    "sapo_probe": ([], ctypes.c_int),
    "sapo_synchronize": ([_P], ctypes.c_int),
    "sapo_error_string": ([ctypes.c_int], ctypes.c_char_p),
    "sapo_logprob_stats": ([_P, _I32, _I64, _I64, _I64, _P, _I64, _F, _P, _P, _P, _P, _P], ctypes.c_int),
    "sapo_fused_forward": ([_P, _I32, _I64, _I64, _I64, _P, _F, _P, _P, _P, LossParams, _P, _P, _P, _P, _P, _P],
                           ctypes.c_int),
    "sapo_logprob_backward": ([_P, _I32, _I64, _I64, _I64, _P, _I64, _F, _P, _P, _P, _P, _P, _I64, _P], ctypes.c_int),
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
    lib.sapo_abi_version.argtypes, lib.sapo_abi_version.restype = [], ctypes.c_int
    if lib.sapo_abi_version() != ABI_VERSION:
        raise KernelLibraryError(f"{path} has ABI {lib.sapo_abi_version()}, expected {ABI_VERSION}: rebuild it")
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def is_available(kind: str) -> bool:
    try:
        load_library(kind)
    except KernelLibraryError:
        return False
    return True


def describe_error(lib: ctypes.CDLL, code: int) -> str:
    """'CUDA error 35 (cudaErrorInsufficientDriver: ...)' for a CUDA error, the library's message for its own."""
    text = lib.sapo_error_string(code).decode(errors="replace")
    return f"CUDA error {code} ({text})" if code > 0 else f"error {code} ({text})"


def sync_mode() -> bool:
    """SAPO_KERNELS_SYNC: "1" synchronises after every launch; "0", empty or unset does not; anything else is a
    ValueError (a typo must not silently turn the debug mode off)."""
    value = os.environ.get(SYNC_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{SYNC_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@lru_cache(maxsize=None)
def launch_problem(device: torch.device) -> str | None:
    """None if the CUDA library can launch on `device`, else why not: the library is missing or of another ABI, or
    sapo_probe's CUDA error (no driver, an older driver than the build's runtime, no kernel image for this GPU).
    Probed once per device: the answer does not change within a process."""
    try:
        lib = load_library("cuda")
    except KernelLibraryError as err:
        return str(err)
    with _device_guard(device):
        code = lib.sapo_probe()
    return None if code == 0 else f"{LIBRARIES['cuda']} cannot launch on {device}: {describe_error(lib, code)}"


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _layout(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, stride {tuple(t.stride())}, dtype {t.dtype}, device {t.device}"


def _refuse(name: str, t, expected: str) -> ValueError:
    got = _layout(t) if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
    return ValueError(f"kernel argument {name!r}: expected {expected}; got {got}")


def _row_stride(name: str, t: torch.Tensor, expected: str) -> int:
    """The row stride of [n, v] rows with unit stride in v, to pass the kernels; a ValueError for any other layout.
    A single row (or column) has no meaningful stride there, so v is passed for it."""
    n, v = t.shape
    if (v > 1 and t.stride(1) != 1) or (n > 1 and t.stride(0) < v) or t.data_ptr() % t.element_size():
        raise _refuse(name, t, expected)
    return t.stride(0) if n > 1 else v


def _span(t: torch.Tensor, row_stride: int) -> tuple[int, int]:
    n, v = t.shape
    start = t.data_ptr()
    return start, start + ((n - 1) * row_stride + v) * t.element_size()


class KernelBackend:
    """Runs the row statistics, the fused single-rank forward and the backward through one kernel library.

    What each call accepts, per tensor passed by pointer (all on the logits' device, of the library's device type):
      logits      [n, v] float32 / bfloat16 / float16, unit stride in v, any row stride >= v (padded rows and offset
                  views are read in place); refused otherwise: a copy would cost the logits-sized buffer the fused
                  op exists to avoid
      targets     int64 [n]; old_logp, advantages, weights, lse, entropy: float32 [n]. A strided one is made
                  contiguous (n elements: cheap); a wrong dtype, shape or device is refused
      grad_logp, grad_entropy   autograd's gradients: converted to float32 and made contiguous (autograd hands
                  expanded, stride-0 gradients for a sum)
      out         the gradient [n, v] in the logits' dtype, unit stride in v, row stride >= v, and either the logits
                  buffer itself with the same row stride (in place) or outside the logits' address range; refused
                  otherwise (it is written, so a copy would lose the result)
    """

    has_fused_loss = True

    def __init__(self, kind: str):
        self.name = kind
        self.lib = load_library(kind)
        self.device_type = "cuda" if kind == "cuda" else "cpu"

    def _logits(self, logits: torch.Tensor) -> int:
        expected = (f"a float32, bfloat16 or float16 [n, v] {self.device_type} tensor with unit stride in v and a "
                    "row stride >= v")
        if not isinstance(logits, torch.Tensor) or logits.dtype not in _DTYPES or logits.dim() != 2 \
                or logits.device.type != self.device_type:
            raise _refuse("logits", logits, expected)
        return _row_stride("logits", logits, expected)

    @staticmethod
    def _rows(name: str, t, n: int, dtype: torch.dtype, device: torch.device, *, convert: bool = False):
        """A per-row array as the kernels read it: `dtype` [n], contiguous, on `device`."""
        if t is None:
            return None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,) or t.device != device \
                or (t.dtype != dtype and not (convert and t.dtype.is_floating_point)):
            raise _refuse(name, t, f"a {dtype} [{n}] tensor on {device}")
        return t.to(dtype).contiguous()

    def _call(self, function: str, device: torch.device, *args) -> None:
        """Launch under the device guard on torch's current stream; in SAPO_KERNELS_SYNC=1 also synchronise."""
        sync = sync_mode()
        with _device_guard(device):
            stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else None
            code = getattr(self.lib, function)(*args, stream)
            if code == 0 and sync:
                code = self.lib.sapo_synchronize(stream)
                function += f" (while running: {SYNC_ENV}=1 synchronised after its launch)"
        if code != 0:
            raise KernelLibraryError(f"{function} failed in {LIBRARIES[self.name]}: {describe_error(self.lib, code)}")

    def _new(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, dtype=torch.float32, device=like.device)

    def stats(self, logits, targets, vocab_start, inv_temperature, with_entropy) -> RowStats:
        row_stride = self._logits(logits)
        n, vocab = logits.shape
        targets = self._rows("targets", targets, n, torch.int64, logits.device)
        row_max, row_sumexp, target_z = self._new(n, logits), self._new(n, logits), self._new(n, logits)
        row_zexp = self._new(n, logits) if with_entropy else None
        self._call(
            "sapo_logprob_stats", logits.device, _ptr(logits), _DTYPES[logits.dtype], n, vocab, row_stride,
            _ptr(targets), vocab_start, inv_temperature, _ptr(row_max), _ptr(row_sumexp), _ptr(row_zexp),
            _ptr(target_z),
        )
        return RowStats(row_max, row_sumexp, row_zexp, target_z)

    def fused_forward(self, logits, targets, inv_temperature, old_logp, advantages, weights, params: LossParams):
        """(logp, lse, weighted token loss, weighted d loss / d logp), each float32 [n]."""
        row_stride = self._logits(logits)
        n, vocab = logits.shape
        rows = {name: self._rows(name, t, n, torch.float32, logits.device)
                for name, t in (("old_logp", old_logp), ("advantages", advantages), ("weights", weights))}
        targets = self._rows("targets", targets, n, torch.int64, logits.device)
        logp, lse, loss, grad = (self._new(n, logits) for _ in range(4))
        self._call(
            "sapo_fused_forward", logits.device, _ptr(logits), _DTYPES[logits.dtype], n, vocab, row_stride,
            _ptr(targets), inv_temperature, _ptr(rows["old_logp"]), _ptr(rows["advantages"]), _ptr(rows["weights"]),
            params, _ptr(logp), _ptr(lse), None, _ptr(loss), _ptr(grad),
        )
        return logp, lse, loss, grad

    def backward(self, logits, targets, vocab_start, inv_temperature, lse, grad_logp, grad_entropy, entropy, out):
        row_stride = self._logits(logits)
        n, vocab = logits.shape
        device = logits.device
        targets = self._rows("targets", targets, n, torch.int64, device)
        lse = self._rows("lse", lse, n, torch.float32, device)
        grad_logp = self._rows("grad_logp", grad_logp, n, torch.float32, device, convert=True)
        grad_entropy = self._rows("grad_entropy", grad_entropy, n, torch.float32, device, convert=True)
        entropy = self._rows("entropy", entropy, n, torch.float32, device)
        out_stride = self._out(logits, row_stride, out)
        self._call(
            "sapo_logprob_backward", device, _ptr(logits), _DTYPES[logits.dtype], n, vocab, row_stride,
            _ptr(targets), vocab_start, inv_temperature, _ptr(lse), _ptr(grad_logp), _ptr(grad_entropy),
            _ptr(entropy), _ptr(out), out_stride,
        )
        return out

    @staticmethod
    def _out(logits: torch.Tensor, row_stride: int, out) -> int:
        """The row stride of the gradient output, after checking it against the logits it may alias."""
        expected = (f"a {logits.dtype} {tuple(logits.shape)} tensor on {logits.device} with unit stride in the vocab "
                    "and a row stride >= its width, either the logits buffer (same strides) or outside its address "
                    "range")
        if not isinstance(out, torch.Tensor) or out.dtype != logits.dtype or out.shape != logits.shape \
                or out.device != logits.device:
            raise _refuse("out", out, expected)
        out_stride = _row_stride("out", out, expected)
        in_place = out.data_ptr() == logits.data_ptr() and out_stride == row_stride
        (a0, a1), (b0, b1) = _span(logits, row_stride), _span(out, out_stride)
        if logits.numel() and not in_place and a0 < b1 and b0 < a1:
            raise _refuse("out", out, expected)
        return out_stride
