import pytest
import torch

from megatron_sapo.losses import LOSS_AGG_MODES, LOSS_TYPES, policy_loss
from megatron_sapo.ops import fused_linear_logprobs, fused_linear_policy_loss, fused_policy_loss
from megatron_sapo.ops.reference import naive_linear_policy_loss, naive_policy_loss

from .conftest import implementations


def batch(b=3, t=5, vocab=123, hidden=16, seed=0, dtype=torch.float32, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, vocab, generator=g) * 2).to(dtype)
    targets = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0, 0] = True
    targets[~mask] = -100  # padding ids at masked positions must not matter
    with torch.no_grad():
        logp = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    old = (logp + spread * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(b, generator=g)
    h = torch.randn(b, t, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dtype)
    return logits, targets, old, adv, mask, h, w


def compare(fused_fn, naive_fn, inputs, implementation, **kw):
    """(loss, metrics, d loss / d logits) of the fused op and of the float64 naive path, from the same inputs."""
    x = inputs[0].detach().clone().requires_grad_()
    loss, metrics = fused_fn(x, *inputs[1:], implementation=implementation, **kw)
    r = inputs[0].detach().double().requires_grad_()
    ref, ref_metrics = naive_fn(r, *inputs[1:], **kw)
    return (loss, metrics, torch.autograd.grad(loss, x)), (ref, ref_metrics, torch.autograd.grad(ref, r))


@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_policy_loss_matches_naive(implementation, loss_type):
    logits, targets, old, adv, mask, _, _ = batch(seed=1)
    for mode in LOSS_AGG_MODES:
        (loss, metrics, (grad,)), (ref, ref_metrics, (rgrad,)) = compare(
            fused_policy_loss, naive_policy_loss, (logits, targets, old, adv, mask),
            loss_type=loss_type, loss_agg_mode=mode, temperature=0.8, implementation=implementation,
        )
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6), mode
        torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-7)
        assert metrics.keys() == ref_metrics.keys()
        for key in metrics:
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_rollout_correction_through_fused_loss(implementation, correction):
    logits, targets, old, adv, mask, _, _ = batch(seed=2)
    rollout = old + 0.7 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))
    for loss_type in ("sapo", "grpo"):
        (loss, metrics, (grad,)), (ref, ref_metrics, (rgrad,)) = compare(
            fused_policy_loss, naive_policy_loss, (logits, targets, old, adv, mask),
            loss_type=loss_type, rollout_log_probs=rollout, rollout_correction=correction,
            implementation=implementation,
        )
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-7)
        assert metrics["mismatch/changed_frac"] == pytest.approx(ref_metrics["mismatch/changed_frac"])


@pytest.mark.parametrize("implementation", implementations())
def test_bf16_logits_error_at_most_plain_bf16(implementation):
    logits, targets, old, adv, mask, _, _ = batch(b=4, t=6, vocab=1000, seed=4, dtype=torch.bfloat16)
    x = logits.detach().clone().requires_grad_()
    loss, _ = fused_policy_loss(x, targets, old, adv, mask, implementation=implementation)
    (grad,) = torch.autograd.grad(loss, x)
    r = logits.detach().double().requires_grad_()
    ref, _ = naive_policy_loss(r, targets, old, adv, mask)
    (rgrad,) = torch.autograd.grad(ref, r)
    # the plain bf16 path: log_softmax in bf16, no upcast
    p = logits.detach().clone().requires_grad_()
    plain_logp = torch.where(mask, torch.log_softmax(p, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0)
    plain, _ = policy_loss(plain_logp, old, adv, mask)
    (pgrad,) = torch.autograd.grad(plain, p)
    assert grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) <= abs(plain.item() - ref.item()) + 1e-6
    assert (grad.double() - rgrad).abs().max() <= (pgrad.double() - rgrad).abs().max() + 1e-6


@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "cispo", "gspo", "sapo_seq"])
def test_fused_linear_policy_loss_matches_naive(implementation, loss_type):
    _, targets, old, adv, mask, h, w = batch(b=3, t=7, vocab=211, hidden=24, seed=5)
    for mode in ("seq-mean-token-mean", "token-mean"):
        # chunks of 4 rows: several chunks and a ragged last one
        (loss, metrics, (gh, gw)), (ref, ref_metrics, (rgh, rgw)) = _linear_pair(
            h, w, targets, old, adv, mask, loss_type, mode, implementation)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(gh.double(), rgh, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gw.double(), rgw, rtol=1e-4, atol=1e-6)
        assert metrics["ratio/mean"] == pytest.approx(ref_metrics["ratio/mean"], rel=1e-5)


def _linear_pair(h, w, targets, old, adv, mask, loss_type, mode, implementation):
    hx, wx = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss, metrics = fused_linear_policy_loss(hx, wx, targets, old, adv, mask, loss_type=loss_type,
                                             loss_agg_mode=mode, temperature=1.3, implementation=implementation,
                                             chunk_bytes=4 * 211 * 4)
    grads = torch.autograd.grad(loss, (hx, wx))
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref, ref_metrics = naive_linear_policy_loss(hr, wr, targets, old, adv, mask, loss_type=loss_type,
                                                loss_agg_mode=mode, temperature=1.3)
    return (loss, metrics, grads), (ref, ref_metrics, torch.autograd.grad(ref, (hr, wr)))


def test_loss_gradient_scales_with_the_incoming_gradient():
    _, targets, old, adv, mask, h, w = batch(seed=6)
    hx = h.detach().clone().requires_grad_()
    loss, _ = fused_linear_policy_loss(hx, w, targets, old, adv, mask)
    (g1,) = torch.autograd.grad(loss * 3.0, hx, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, hx)
    torch.testing.assert_close(g1, 3.0 * g2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"logits": torch.randn(3, 5)}, "logits must be \\[batch, seq_len, vocab_shard\\]"),
        ({"targets": torch.zeros(3, 4, dtype=torch.long)}, "targets shape \\(3, 4\\)"),
        ({"old": torch.zeros(3, 4)}, "response_mask shape \\(3, 5\\) does not match old_log_probs shape \\(3, 4\\)"),
        ({"mask": torch.zeros(3, 5, dtype=torch.bool)}, "response_mask has no response tokens"),
        ({"loss_type": "ppo"}, "unknown loss_type 'ppo'"),
        ({"temperature": -1.0}, "temperature must be a finite number > 0"),
    ],
)
def test_fused_policy_loss_bad_input(kwargs, message):
    logits, targets, old, adv, mask, _, _ = batch()
    args = {"logits": logits, "targets": targets, "old": old, "adv": adv, "mask": mask}
    options = {k: v for k, v in kwargs.items() if k not in args}
    args.update({k: v for k, v in kwargs.items() if k in args})
    with pytest.raises(ValueError, match=message):
        fused_policy_loss(args["logits"], args["targets"], args["old"], args["adv"], args["mask"], **options)


@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("bad_id,vocab_start", [(123, 0), (10_000, 0), (5, 10)])
def test_fused_policy_loss_target_out_of_shard(implementation, bad_id, vocab_start):
    logits, targets, old, adv, mask, _, _ = batch()
    targets = targets.clone() + vocab_start
    targets[~mask] = -100
    targets[1, 2] = bad_id
    mask[1, 2] = True
    with pytest.raises(ValueError, match="target id out of range at rows \\[7\\]"):
        fused_policy_loss(logits, targets, old, adv, mask, vocab_start=vocab_start, implementation=implementation)


def test_fused_linear_bad_input():
    _, targets, old, adv, mask, h, w = batch()
    with pytest.raises(ValueError, match="same H"):
        fused_linear_policy_loss(h, w[:, :-1], targets, old, adv, mask)
    with pytest.raises(ValueError, match="must share dtype and device"):
        fused_linear_policy_loss(h, w.double(), targets, old, adv, mask)
    bad = targets.clone()
    bad[0, 0] = 10_000
    with pytest.raises(ValueError, match="target id out of range at rows \\[0\\]"):
        fused_linear_policy_loss(h, w, bad, old, adv, mask)


@pytest.mark.parametrize("implementation", implementations())
def test_fused_linear_logprobs_matches_naive(implementation):
    _, targets, _, _, mask, h, w = batch(b=3, t=7, vocab=211, hidden=24, seed=8)
    targets = torch.where(mask, targets, -100)
    logp = fused_linear_logprobs(h, w, targets, temperature=0.9, implementation=implementation,
                                 chunk_bytes=4 * 211 * 4)
    ref = torch.log_softmax((h.double() @ w.double().t()) / 0.9, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(logp.double(), torch.where(mask, ref, 0.0), rtol=1e-6, atol=1e-5)
    assert not logp.requires_grad


def test_naive_reference_keeps_float64_and_upcasts_bf16():
    """The tests' reference is float64 when given float64 logits (it once cast to fp32 and was called float64): on
    logits whose log-softmax fp32 cannot resolve, it agrees with a hand float64 log-sum-exp to 1e-12."""
    from megatron_sapo.ops.reference import naive_logprobs

    logits = torch.tensor([[30.0, 30.0 + 1e-9, -5.0, 12.345678901234]], dtype=torch.float64)
    targets = torch.tensor([1])
    logp = naive_logprobs(logits, targets)
    expected = logits[0, 1] - (logits[0] - logits[0].max()).exp().sum().log() - logits[0].max()
    assert logp.dtype == torch.float64 and abs(logp.item() - expected.item()) < 1e-12
    assert abs(naive_logprobs(logits.float(), targets).item() - expected.item()) > 1e-10  # fp32 cannot
    assert naive_logprobs(logits.bfloat16(), targets).dtype == torch.float32
