import pytest
import torch

from megatron_sapo.ops import fused_logprobs

from .cases import make_logits
from .conftest import implementations


def reference(logits, targets, temperature=1.0):
    """float64 log-softmax, gather and entropy, with autograd; ignored rows (target < 0) give 0."""
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
    logp = torch.where(targets >= 0, logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0)
    p = torch.exp(logp_all)
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return logp, torch.where(targets >= 0, entropy, 0.0)


def run_both(logits, targets, implementation, temperature=1.0, grad_weights=(1.0, 0.5), **kw):
    """Values and logits gradients of sum(a * logp + b * entropy) for the op and the float64 reference."""
    g = torch.Generator().manual_seed(7)
    wa = torch.randn(targets.shape, generator=g) * grad_weights[0]
    wb = torch.randn(targets.shape, generator=g) * grad_weights[1]
    x = logits.detach().clone().requires_grad_()
    logp, ent = fused_logprobs(x, targets, temperature=temperature, return_entropy=True,
                               implementation=implementation, **kw)
    (logp.double() * wa + ent.double() * wb).sum().backward()
    xr = logits.detach().double().requires_grad_()
    rlogp, rent = reference(xr, targets, temperature)
    (rlogp * wa + torch.where(torch.isfinite(rent), rent, 0.0) * wb).sum().backward()
    return (logp, ent, x.grad), (rlogp, rent, xr.grad)


CASES = ["random", "all_negative", "neg_inf_padding", "peaked"]


@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("vocab", [123, 1000])
def test_fp32_matches_float64_reference(implementation, case, vocab):
    logits, targets = make_logits(case, 6, vocab, seed=vocab)
    (logp, ent, grad), (rlogp, rent, rgrad) = run_both(logits, targets, implementation, chunk_bytes=4 * vocab * 4)
    assert logp.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(logp.double(), rlogp, rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=2e-5)
    # The backward forms p = exp(z - lse) with lse rounded to fp32: where |lse| ~ 40 (the peaked case) its ulp, 4e-6,
    # bounds the gradient's absolute accuracy near p = 1 (measured 9e-7, against 2.4e-7 for fp32 log_softmax, which
    # keeps z - max exact); immaterial for bf16 logits, whose gradient is stored with 4e-3 relative precision.
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=2e-6 if case == "peaked" else 1e-6)
    if case == "neg_inf_padding":
        assert torch.all(grad[:, -(vocab // 8):] == 0)


@pytest.mark.parametrize("implementation", implementations())
def test_temperature_ignored_rows_and_3d_shapes(implementation):
    logits, targets = make_logits("random", 2 * 4, 97, seed=3)
    logits, targets = logits.view(2, 4, 97), targets.view(2, 4).clone()
    targets[0, 1] = -100
    targets[1, 3] = -100
    (logp, ent, grad), (rlogp, rent, rgrad) = run_both(logits, targets, implementation, temperature=0.7)
    assert logp.shape == (2, 4)
    torch.testing.assert_close(logp.double(), rlogp, rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=1e-6)
    assert logp[0, 1] == 0 and ent[1, 3] == 0 and torch.all(grad[0, 1] == 0) and torch.all(grad[1, 3] == 0)


def test_full_qwen_vocab_torch_path():
    logits, targets = make_logits("random", 3, 151936, seed=11)
    (logp, ent, grad), (rlogp, rent, rgrad) = run_both(logits, targets, "torch", chunk_bytes=2 * 151936 * 4)
    torch.testing.assert_close(logp.double(), rlogp, rtol=1e-6, atol=5e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=1e-7)


@pytest.mark.host_kernel
def test_full_qwen_vocab_host_kernel():
    logits, targets = make_logits("neg_inf_padding", 2, 151936, seed=12)
    (logp, ent, grad), (rlogp, rent, rgrad) = run_both(logits, targets, "host_kernel")
    torch.testing.assert_close(logp.double(), rlogp, rtol=1e-6, atol=5e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_the_plain_torch_path(implementation, dtype):
    # Cut Cross-Entropy's criterion: against the float64 reference, the op's error must not exceed that of the plain
    # low-precision torch path (log_softmax in the input dtype) plus a small tolerance.
    logits, targets = make_logits("random", 8, 1000, seed=5, dtype=dtype)
    (logp, _, grad), (rlogp, _, rgrad) = run_both(logits, targets, implementation)
    x = logits.detach().clone().requires_grad_()
    plain = torch.log_softmax(x, dim=-1).gather(-1, targets[:, None])[:, 0]
    g = torch.Generator().manual_seed(7)
    (plain * torch.randn(targets.shape, generator=g)).sum().backward()
    assert grad.dtype == dtype
    assert (logp.double() - rlogp).abs().max() <= (plain.double() - rlogp).abs().max() + 1e-6
    # the entropy term of run_both's gradient is not in the plain path: compare the log-prob part only
    (_, _, grad_lp), (_, _, rgrad_lp) = run_both(logits, targets, implementation, grad_weights=(1.0, 0.0))
    assert (grad_lp.double() - rgrad_lp).abs().max() <= (x.grad.double() - rgrad_lp).abs().max() + 1e-6


@pytest.mark.parametrize("implementation", implementations())
def test_zero_tokens(implementation):
    logits = torch.randn(0, 5, 50, requires_grad=True)
    logp = fused_logprobs(logits, torch.zeros(0, 5, dtype=torch.long), implementation=implementation)
    assert logp.shape == (0, 5)
    logp.sum().backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("implementation", implementations())
def test_inplace_backward_writes_the_gradient_into_the_logits(implementation):
    logits, targets = make_logits("random", 5, 300, seed=9)
    (_, _, expected), _ = run_both(logits, targets, implementation, grad_weights=(1.0, 0.0))
    buffer = logits.clone()
    leaf = buffer.detach().requires_grad_()
    view = leaf * 1.0  # a non-leaf holding the buffer's values, as a model's output would
    logp = fused_logprobs(view, targets, implementation=implementation, inplace_backward=True)
    g = torch.Generator().manual_seed(7)
    (logp * torch.randn(targets.shape, generator=g)).sum().backward()
    torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=0)


def test_no_grad_forward_for_old_log_probs():
    logits, targets = make_logits("random", 4, 64)
    with torch.no_grad():
        logp = fused_logprobs(logits, targets)
    assert not logp.requires_grad
    torch.testing.assert_close(logp.double(), reference(logits, targets)[0], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: (torch.randn(2, 3, 10), torch.zeros(2, 4, dtype=torch.long), {}), "targets shape \\(2, 4\\)"),
        (lambda: (torch.randn(2, 10), torch.zeros(2), {}), "targets must hold integer token ids"),
        (lambda: (torch.randn(2, 10).long(), torch.zeros(2, dtype=torch.long), {}), "logits dtype must be"),
        (lambda: (torch.randn(2, 10), torch.tensor([3, 10]), {}), "target id out of range at rows \\[1\\]"),
        (lambda: (torch.randn(2, 10), torch.tensor([3, -5]), {}), "negative target ids at flattened rows \\[1\\]"),
        (lambda: (torch.randn(10, 2).t(), torch.tensor([1, 2]), {}), "unsupported logits layout"),
        (lambda: (torch.randn(2, 10), torch.tensor([1, 2]), {"temperature": 0.0}), "temperature must be"),
        (lambda: (torch.randn(2, 10), torch.tensor([1, 2]), {"implementation": "triton"}), "unknown implementation"),
        (lambda: (torch.randn(2, 10), torch.tensor([1, 2]), {"implementation": "cuda"}),
         "implementation 'cuda' needs cuda tensors"),
        (lambda: (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), {}), "non-finite log-prob at rows \\[0\\]"),
        (lambda: (torch.tensor([[0.0, float("-inf")]]), torch.tensor([1]), {}), "target is a -inf"),
        (lambda: (torch.randn(2, 10), torch.tensor([1, 2]), {"vocab_start": -1}), "vocab_start must be"),
    ],
)
def test_bad_input_is_named(make, message):
    logits, targets, kwargs = make()
    with pytest.raises(ValueError, match=message):
        fused_logprobs(logits, targets, **kwargs)


def test_target_beyond_shard_with_offset_is_reported():
    with pytest.raises(ValueError, match="not in the vocab \\[100, 110\\)"):
        fused_logprobs(torch.randn(2, 10), torch.tensor([100, 99]), vocab_start=100)
