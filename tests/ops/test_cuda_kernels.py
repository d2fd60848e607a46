"""The CUDA build of the kernels on a real GPU against the float64 CPU reference or torch (skipped where no GPU
exists): layouts (offset views, padded row strides, in place), streams and devices, and a full-size bf16 batch."""

import pytest
import torch

from megatron_sapo.ops import fused_linear_policy_loss, fused_logprobs, fused_policy_loss, is_available
from megatron_sapo.ops.reference import naive_linear_policy_loss, naive_policy_loss

from .cases import make_logits
from .test_kernel_library import check_padded_rows
from .test_logprobs import reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda_library():
    if not is_available("cuda"):
        pytest.fail("kernels/build/libsapo_kernels_cuda.so is missing on a GPU machine: run `make kernels`")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float16, 2e-5)])
@pytest.mark.parametrize("case", ["random", "all_negative", "neg_inf_padding", "peaked"])
@pytest.mark.parametrize("vocab", [123, 1000, 151936])
def test_logprobs_and_gradient(dtype, atol, case, vocab):
    logits, targets = make_logits(case, 33, vocab, seed=vocab, dtype=dtype)
    targets[5] = -100
    x = logits.cuda().requires_grad_()
    logp, ent = fused_logprobs(x, targets.cuda(), temperature=0.9, return_entropy=True, implementation="cuda")
    (logp.sum() + 0.5 * ent.sum()).backward()
    xr = logits.double().requires_grad_()
    rlogp, rent = reference(xr, targets, 0.9)
    (rlogp.sum() + 0.5 * torch.where(torch.isfinite(rent), rent, 0.0).sum()).backward()
    torch.testing.assert_close(logp.cpu().double(), rlogp, rtol=1e-5, atol=atol)
    torch.testing.assert_close(ent.cpu().double(), rent, rtol=1e-4, atol=atol * 5)
    # fp32: the gradient is p * (...) with p = exp(x - lse), and lse sums up to 151,936 terms in the GPU's own order:
    # a few ulp of lse (~1e-6 at |lse| ~ 12) reach the gradient as ~1e-6 absolute (1.3e-6 seen on an H200)
    grad_atol, grad_rtol = (4e-6, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2)
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, rtol=grad_rtol, atol=grad_atol)


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "gspo"])
def test_policy_loss_fused_kernel(loss_type):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 5000, generator=g) * 2
    targets = torch.randint(0, 5000, (4, 9), generator=g)
    mask = torch.rand(4, 9, generator=g) > 0.2
    old = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] + 0.3 * torch.randn(4, 9, generator=g)
    adv = torch.randn(4, generator=g)
    x = logits.cuda().requires_grad_()
    loss, metrics = fused_policy_loss(x, targets.cuda(), old.cuda(), adv.cuda(), mask.cuda(), loss_type=loss_type,
                                      implementation="cuda")
    (grad,) = torch.autograd.grad(loss, x)
    xr = logits.double().requires_grad_()
    ref, ref_metrics = naive_policy_loss(xr, targets, old, adv, mask, loss_type=loss_type)
    (rgrad,) = torch.autograd.grad(ref, xr)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.cpu().double(), rgrad, rtol=1e-4, atol=1e-7)
    assert metrics["ratio/mean"] == pytest.approx(ref_metrics["ratio/mean"], rel=1e-5)


def test_linear_path_bf16():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 64, 256, generator=g)
    w = torch.randn(32000, 256, generator=g) / 16
    targets = torch.randint(0, 32000, (2, 64), generator=g)
    mask = torch.ones(2, 64, dtype=torch.bool)
    old = -torch.rand(2, 64, generator=g) * 5
    adv = torch.tensor([1.0, -0.5])
    hx = h.cuda().bfloat16().requires_grad_()
    wx = w.cuda().bfloat16().requires_grad_()
    loss, _ = fused_linear_policy_loss(hx, wx, targets.cuda(), old.cuda(), adv.cuda(), mask.cuda(),
                                       implementation="cuda", chunk_bytes=32 * 32000 * 4)
    gh, gw = torch.autograd.grad(loss, (hx, wx))
    hr, wr = hx.detach().cpu().double().requires_grad_(), wx.detach().cpu().double().requires_grad_()
    ref, _ = naive_linear_policy_loss(hr, wr, targets, old, adv, mask)
    rgh, rgw = torch.autograd.grad(ref, (hr, wr))
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2, abs=1e-3)
    assert (gh.cpu().double() - rgh).abs().max() < 2e-2 * rgh.abs().max()
    assert (gw.cpu().double() - rgw).abs().max() < 2e-2 * rgw.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pad,offset", [(0, 0), (3, 1), (9, 7), (64, 5)])
@pytest.mark.parametrize("inplace", [False, True])
def test_padded_and_offset_rows(dtype, pad, offset, inplace):
    check_padded_rows("cuda", "cuda", dtype, pad, offset, inplace, n=33, vocab=1000)


def test_launches_on_the_current_side_stream():
    logits, targets = make_logits("random", 64, 151936, seed=2, dtype=torch.bfloat16)
    x, t = logits.cuda(), targets.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # produced on the side stream just before the op: a launch on another stream could read it half-written
        y = (x.float() * 1.5).to(torch.bfloat16).requires_grad_()
        logp = fused_logprobs(y, t, implementation="cuda")
        logp.sum().backward()
        expected = torch.log_softmax(y.detach().float(), -1).gather(-1, t[:, None])[:, 0]
        expected_grad = torch.nn.functional.one_hot(t, 151936) - torch.softmax(y.detach().float(), -1)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(y.grad.float(), expected_grad, rtol=2 ** -7, atol=1e-9)


def test_tensors_on_a_device_other_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    logits, targets = make_logits("random", 16, 5000, seed=3, dtype=torch.bfloat16)
    assert torch.cuda.current_device() == 0
    logp = fused_logprobs(logits.to("cuda:1"), targets.to("cuda:1"), implementation="cuda")
    torch.testing.assert_close(logp.cpu().double(), reference(logits, targets)[0], rtol=1e-5, atol=2e-5)


def test_qwen_vocab_16k_tokens_bf16_against_torch():
    n, vocab, rows = 16384, 151936, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, vocab, generator=g, device="cuda", dtype=torch.bfloat16) * 3).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    targets[::97] = -100
    weights = torch.randn(n, generator=g, device="cuda")
    logp, ent = fused_logprobs(x, targets, return_entropy=True, implementation="cuda")
    (logp * weights).sum().backward()
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        z = x.detach()[part].float()
        valid = targets[part] >= 0
        logp_all = torch.log_softmax(z, -1)
        p = logp_all.exp()
        want_logp = torch.where(valid, logp_all.gather(-1, targets[part].clamp(min=0)[:, None])[:, 0], 0.0)
        want_ent = torch.where(valid, -(p * logp_all).sum(-1), 0.0)
        hit = torch.nn.functional.one_hot(targets[part].clamp(min=0), vocab)
        want_grad = torch.where(valid[:, None], weights[part, None] * (hit - p), 0.0)
        torch.testing.assert_close(logp[part], want_logp, rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(ent[part], want_ent, rtol=1e-4, atol=5e-4)
        # the gradient is stored in bf16: half an ulp is 2^-9 relative
        torch.testing.assert_close(x.grad[part].float(), want_grad, rtol=2 ** -7, atol=1e-9)
