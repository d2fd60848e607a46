"""The kernel library binding's safety: layouts it reads in place, layouts it refuses by name, CUDA errors by name,
the SAPO_KERNELS_SYNC debug mode and the "auto" fallback. The layouts run through the host build of the CUDA source
(the same kernels on CPU threads) against the float64 reference; the CUDA library's own answers come from the real
libsapo_kernels_cuda.so, which on a machine without a GPU loads and fails every call for want of a driver."""

import contextlib

import pytest
import torch

from megatron_sapo.ops import backends, fused_logprobs, fused_policy_loss, kernel_library
from megatron_sapo.ops.backends import select_backend
from megatron_sapo.ops.kernel_library import (
    KernelBackend,
    KernelLibraryError,
    LossParams,
    describe_error,
    is_available,
    load_library,
    sync_mode,
)
from megatron_sapo.ops.reference import naive_policy_loss
from megatron_sapo.ops.torch_chunked import TorchChunkedBackend

from .cases import make_logits
from .test_logprobs import reference

host_kernel = pytest.mark.host_kernel
DRIVER_ERRORS = {35: "cudaErrorInsufficientDriver", 100: "cudaErrorNoDevice"}


def check_padded_rows(implementation, device, dtype, pad, offset, inplace, n=5, vocab=123):
    """fused_logprobs on columns [offset, offset + vocab) of rows `vocab + pad` wide, NaN elsewhere (so that rows
    start off 16-byte boundaries and a read outside the view shows), against the float64 reference; the gradient
    lands inside the view only, written in place into the padded rows with `inplace`."""
    logits, targets = make_logits("neg_inf_padding", n, vocab, seed=pad, dtype=dtype)
    targets[2] = -100
    buffer = torch.full((n, vocab + pad), float("nan"), dtype=dtype)
    buffer[:, offset:offset + vocab] = logits
    leaf = buffer.to(device).requires_grad_()
    view = (leaf * 1.0)[:, offset:offset + vocab]  # a non-leaf, as a model's output would be
    assert view.stride(0) == vocab + pad
    logp, ent = fused_logprobs(view, targets.to(device), temperature=0.8, return_entropy=True,
                               implementation=implementation, inplace_backward=inplace)
    g = torch.Generator().manual_seed(3)
    wa, wb = torch.randn(n, generator=g), torch.randn(n, generator=g)
    (logp * wa.to(device) + ent * wb.to(device)).sum().backward()
    xr = logits.double().requires_grad_()
    rlogp, rent = reference(xr, targets, 0.8)
    (rlogp * wa + rent * wb).sum().backward()
    torch.testing.assert_close(logp.cpu().double(), rlogp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.cpu().double(), rent, rtol=1e-4, atol=1e-4)
    grad = leaf.grad.cpu()
    grad_tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad[:, offset:offset + vocab].double(), xr.grad, rtol=grad_tol, atol=grad_tol)
    outside = torch.ones_like(grad, dtype=torch.bool)
    outside[:, offset:offset + vocab] = False
    assert torch.all(grad[outside] == 0)


@host_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pad,offset", [(3, 0), (5, 1), (9, 7)])
@pytest.mark.parametrize("inplace", [False, True])
def test_padded_and_offset_rows_are_read_in_place(dtype, pad, offset, inplace):
    check_padded_rows("host_kernel", "cpu", dtype, pad, offset, inplace)


@host_kernel
def test_padded_3d_logits_through_the_fused_loss():
    g = torch.Generator().manual_seed(4)
    buffer = torch.randn(2, 3, 130, generator=g)
    logits = buffer[..., 2:125]  # [2, 3, 123] rows 130 apart: viewable as [6, 123] without a copy
    targets = torch.randint(0, 123, (2, 3), generator=g)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    old = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0].float() + 0.2
    adv = torch.tensor([0.7, -1.1])
    x = logits.detach().requires_grad_()
    loss, _ = fused_policy_loss(x, targets, old, adv, mask, implementation="host_kernel")
    (grad,) = torch.autograd.grad(loss, x)
    xr = logits.detach().double().requires_grad_()
    ref, _ = naive_policy_loss(xr, targets, old, adv, mask)
    (rgrad,) = torch.autograd.grad(ref, xr)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-7)


def every_other(t: torch.Tensor) -> torch.Tensor:
    """The same values with stride 2."""
    return torch.stack([t, torch.full_like(t, -7)], 1)[:, 0]


@host_kernel
def test_strided_row_arrays_are_made_contiguous():
    logits, targets = make_logits("random", 6, 77, seed=5)
    backend = KernelBackend("host_kernel")
    g = torch.Generator().manual_seed(6)
    old, adv = -torch.rand(6, generator=g) * 5, torch.randn(6, generator=g)
    weights = torch.rand(6, generator=g)
    params = LossParams(1, 1.0, 1.05, 0.8, 1.28, 0.0, 20.0)
    assert every_other(targets).stride() == (2,)
    want = backend.fused_forward(logits, targets, 1.0, old, adv, weights, params)
    got = backend.fused_forward(logits, every_other(targets), 1.0, every_other(old), every_other(adv),
                                every_other(weights), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    lse, grad_logp = want[1], torch.ones(())
    out = torch.empty_like(logits)
    backend.backward(logits, every_other(targets), 0, 1.0, every_other(lse), grad_logp.expand(6), None, None, out)
    expected = torch.empty_like(logits)
    backend.backward(logits, targets, 0, 1.0, lse, torch.ones(6), None, None, expected)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@host_kernel
@pytest.mark.parametrize(
    "change,message",
    [
        ({"logits": torch.randn(4, 40)[:, ::2]}, r"'logits'.*unit stride in v.*stride \(40, 2\)"),
        ({"logits": torch.randn(1, 20).expand(4, 20)}, r"'logits'.*got shape \(4, 20\), stride \(0, 1\)"),
        ({"logits": torch.randn(4, 20, dtype=torch.float64)}, r"'logits'.*dtype torch.float64"),
        ({"targets": torch.zeros(4, dtype=torch.int32)}, r"'targets': expected a torch.int64 \[4\] tensor on cpu; "
                                                         r"got shape \(4,\), stride \(1,\), dtype torch.int32"),
        ({"targets": torch.zeros(4, dtype=torch.int64, device="meta")}, r"'targets'.*device meta"),
        ({"targets": torch.zeros(5, dtype=torch.int64)}, r"'targets'.*got shape \(5,\)"),
        ({"advantages": torch.zeros(4, dtype=torch.float64)}, r"'advantages'.*dtype torch.float64"),
        ({"old_logp": torch.zeros(4, 1)}, r"'old_logp'.*got shape \(4, 1\)"),
    ],
)
def test_forward_refuses_what_it_would_misread(change, message):
    backend = KernelBackend("host_kernel")
    args = {"logits": torch.randn(4, 20), "targets": torch.zeros(4, dtype=torch.int64), "old_logp": torch.zeros(4),
            "advantages": torch.zeros(4), "weights": torch.ones(4)}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        backend.fused_forward(args["logits"], args["targets"], 1.0, args["old_logp"], args["advantages"],
                              args["weights"], LossParams(1, 1.0, 1.0, 0.8, 1.2, 0.0, 20.0))


@host_kernel
def test_backward_refuses_an_output_it_would_misread_or_clobber():
    backend = KernelBackend("host_kernel")
    buffer = torch.randn(4, 21)
    logits, targets = buffer[:, :20], torch.zeros(4, dtype=torch.int64)
    lse, grad = torch.zeros(4), torch.ones(4)

    def run(out):
        backend.backward(logits, targets, 0, 1.0, lse, grad, None, None, out)

    with pytest.raises(ValueError, match=r"'out'.*got shape \(4, 20\), stride \(21, 1\)"):
        run(buffer[:, 1:])  # overlaps the logits one column over: rows would be read after being written
    with pytest.raises(ValueError, match=r"'out'.*dtype torch.bfloat16"):
        run(torch.empty(4, 20, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"'out'.*stride \(1, 4\)"):
        run(torch.empty(20, 4).t())
    with pytest.raises(ValueError, match=r"'grad_entropy'.*got shape \(3,\)"):
        backend.backward(logits, targets, 0, 1.0, lse, grad, torch.ones(3), torch.ones(4), torch.empty(4, 20))
    run(logits)  # in place, same strides: allowed


def test_cuda_library_refuses_cpu_tensors():
    if not is_available("cuda"):
        pytest.skip("kernels/build/libsapo_kernels_cuda.so not built (make kernels, needs nvcc)")
    with pytest.raises(ValueError, match=r"'logits'.*cuda tensor.*device cpu"):
        KernelBackend("cuda").stats(torch.randn(2, 8), torch.zeros(2, dtype=torch.int64), 0, 1.0, False)


def _cuda_library_without_gpu():
    if not is_available("cuda"):
        pytest.skip("kernels/build/libsapo_kernels_cuda.so not built (make kernels, needs nvcc)")
    lib = load_library("cuda")
    code = lib.sapo_probe()
    if code == 0:
        pytest.skip("the CUDA library can launch here: its driver errors cannot be produced")
    return lib, code


def test_cuda_errors_are_reported_by_name():
    lib, code = _cuda_library_without_gpu()
    assert code in DRIVER_ERRORS, describe_error(lib, code)
    assert describe_error(lib, code).startswith(f"CUDA error {code} ({DRIVER_ERRORS[code]}: ")
    assert describe_error(lib, 35) == ("CUDA error 35 (cudaErrorInsufficientDriver: CUDA driver version is "
                                       "insufficient for CUDA runtime version)")
    assert describe_error(lib, -2).startswith("error -2 (bad shape")
    # A real launch: it fails in the runtime's initialisation, before any of these (host) pointers could be used.
    backend = KernelBackend("cuda")
    x, targets, out = torch.zeros(1, 8), torch.zeros(1, dtype=torch.int64), torch.zeros(4)
    with pytest.raises(KernelLibraryError) as err:
        backend._call("sapo_logprob_stats", torch.device("cpu"), kernel_library._ptr(x), 0, 1, 8, 8,
                      kernel_library._ptr(targets), 0, 1.0, *(kernel_library._ptr(out[i:]) for i in range(4)))
    assert str(err.value) == (f"sapo_logprob_stats failed in libsapo_kernels_cuda.so: CUDA error {code} "
                              f"({lib.sapo_error_string(code).decode()})")


@host_kernel
def test_host_library_describes_its_errors():
    lib = KernelBackend("host_kernel").lib
    assert lib.sapo_probe() == 0 and lib.sapo_synchronize(None) == 0
    assert describe_error(lib, -4).startswith("error -4 (unknown loss kind")
    assert describe_error(lib, 9) == ("CUDA error 9 (cudaErrorInvalidConfiguration: invalid configuration argument "
                                      "(host emulation))")


@pytest.mark.parametrize("value,expected", [(None, False), ("", False), ("0", False), ("1", True), (" 1 ", True)])
def test_sync_mode_flag(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("SAPO_KERNELS_SYNC", raising=False)
    else:
        monkeypatch.setenv("SAPO_KERNELS_SYNC", value)
    assert sync_mode() is expected


def test_sync_mode_rejects_other_values(monkeypatch):
    monkeypatch.setenv("SAPO_KERNELS_SYNC", "yes")
    with pytest.raises(ValueError, match="SAPO_KERNELS_SYNC must be 0 or 1, got 'yes'"):
        sync_mode()


class _Recorder:
    """The library with its calls recorded, and sapo_synchronize answering `sync_code`."""

    def __init__(self, lib, sync_code=0):
        self.lib, self.sync_code, self.calls = lib, sync_code, []

    def __getattr__(self, name):
        fn = getattr(self.lib, name)

        def call(*args):
            self.calls.append(name)
            return self.sync_code if name == "sapo_synchronize" else fn(*args)

        return call


@host_kernel
@pytest.mark.parametrize("sync", ["0", "1"])
def test_sync_mode_synchronises_after_each_launch(monkeypatch, sync):
    backend = KernelBackend("host_kernel")
    backend.lib = _Recorder(backend.lib)
    monkeypatch.setenv("SAPO_KERNELS_SYNC", sync)
    logits, targets = make_logits("random", 3, 50, seed=8)
    stats = backend.stats(logits, targets, 0, 1.0, True)
    launches = ["sapo_logprob_stats", "sapo_synchronize"] if sync == "1" else ["sapo_logprob_stats"]
    assert backend.lib.calls == launches
    torch.testing.assert_close(stats.max, logits.max(-1).values, rtol=0, atol=0)


@host_kernel
def test_sync_mode_reports_a_fault_at_the_launching_call(monkeypatch):
    backend = KernelBackend("host_kernel")
    backend.lib = _Recorder(backend.lib, sync_code=700)  # what a kernel's illegal address gives at synchronisation
    monkeypatch.setenv("SAPO_KERNELS_SYNC", "1")
    logits, targets = make_logits("random", 3, 50, seed=8)
    with pytest.raises(KernelLibraryError, match=r"^sapo_logprob_stats \(while running: SAPO_KERNELS_SYNC=1 "
                                                 r"synchronised after its launch\) failed in "
                                                 r"libsapo_kernels_host.so: CUDA error 700 \("):
        backend.stats(logits, targets, 0, 1.0, False)


def fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("fused ops: implementation='auto'")]


@pytest.fixture
def fresh_selection(monkeypatch):
    """A process that has not probed or warned yet; the caches are emptied again afterwards."""
    monkeypatch.setattr(backends, "_fallback_warned", False)
    kernel_library.launch_problem.cache_clear()
    kernel_library.load_library.cache_clear()
    yield
    kernel_library.launch_problem.cache_clear()
    kernel_library.load_library.cache_clear()


def test_auto_falls_back_once_when_the_library_is_missing(monkeypatch, tmp_path, fresh_selection):
    monkeypatch.setenv("SAPO_KERNELS_DIR", str(tmp_path))
    with pytest.warns(RuntimeWarning) as record:
        first = select_backend("auto", torch.device("cuda", 0))
        second = select_backend("auto", torch.device("cuda", 1))
    assert isinstance(first, TorchChunkedBackend) and isinstance(second, TorchChunkedBackend)
    record = fallback_warnings(record)
    assert len(record) == 1
    assert record[0] == (f"fused ops: implementation='auto' runs the torch path on CUDA tensors: "
                                      f"{tmp_path}/libsapo_kernels_cuda.so is not built: run `make kernels` (or set "
                                      "SAPO_KERNELS_DIR)")
    with pytest.raises(KernelLibraryError, match="is not built"):
        select_backend("cuda", torch.device("cuda", 0))


def test_auto_falls_back_once_when_the_library_cannot_launch(monkeypatch, fresh_selection):
    """CUDA tensors on a device where the built library cannot launch: that combination cannot exist on a machine
    without a GPU, where torch has no CUDA device to guard. So the device guard alone is replaced by a no-op; the
    probe is the real library's sapo_probe, which fails here for want of a driver."""
    _cuda_library_without_gpu()
    monkeypatch.setattr(kernel_library, "_device_guard", lambda device: contextlib.nullcontext())
    with pytest.warns(RuntimeWarning) as record:
        for _ in range(3):
            assert isinstance(select_backend("auto", torch.device("cuda", 0)), TorchChunkedBackend)
    record = fallback_warnings(record)
    assert len(record) == 1
    message = record[0]
    assert "libsapo_kernels_cuda.so cannot launch on cuda:0: CUDA error " in message
    assert any(f"({name}: " in message for name in DRIVER_ERRORS.values()), message
    assert isinstance(select_backend("cuda", torch.device("cuda", 0)), KernelBackend)  # "cuda" is taken at its word

