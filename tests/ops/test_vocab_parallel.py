"""The vocab-parallel ops on 2 gloo processes against the single-process float64 reference. The vocab (123) is split
unevenly (62 + 61), and targets fall in both shards, so every row's target lives on another rank for one of them."""

import os

import pytest
import torch
import torch.distributed as dist

from megatron_sapo.ops import fused_linear_policy_loss, fused_logprobs, fused_policy_loss, is_available
from megatron_sapo.ops.reference import naive_linear_policy_loss, naive_policy_loss
from megatron_sapo.policy.parallel import spawn_local

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
VOCAB, SPLIT, HIDDEN = 123, 62, 16


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, VOCAB, generator=g, dtype=torch.float64) * 2
    logits[..., -3:] = float("-inf")  # padded entries at the end of the last shard
    targets = torch.randint(0, VOCAB - 3, (3, 6), generator=g)
    targets[0, :3] = torch.tensor([0, SPLIT - 1, SPLIT])  # both sides of the shard boundary
    mask = torch.rand(3, 6, generator=g) > 0.2
    old = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] + 0.3 * torch.randn(3, 6, generator=g,
                                                                                                   dtype=torch.float64)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    hidden = torch.randn(3, 6, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) / 4
    return logits, targets, mask, old.float(), adv.float(), hidden, weight


def _worker(rank, implementations):
    dist.init_process_group("gloo")
    logits, targets, mask, old, adv, hidden, weight = _data()
    shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    start = shard.start
    for impl in implementations:
        # log-probs and entropy, and their gradient on this rank's shard
        x = logits[..., shard].float().contiguous().requires_grad_()
        logp, ent = fused_logprobs(x, targets, temperature=0.9, process_group=dist.group.WORLD,
                                   vocab_start=start, return_entropy=True, implementation=impl)
        (logp.sum() + 0.5 * ent.sum()).backward()
        xr = logits.clone().requires_grad_()
        ref_all = torch.log_softmax(xr / 0.9, -1)
        ref_logp = ref_all.gather(-1, targets[..., None])[..., 0]
        p = ref_all.exp()
        ref_ent = -(p * torch.where(p > 0, ref_all, 0.0)).sum(-1)
        (ref_logp.sum() + 0.5 * ref_ent.sum()).backward()
        torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-6, atol=2e-5)
        torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(x.grad.double(), xr.grad[..., shard], rtol=1e-5, atol=1e-6)

        # the policy losses from sharded logits (sapo: the fused kernel is single-rank only, so this is the
        # log-prob + library route; gspo: a sequence loss)
        for loss_type in ("sapo", "grpo", "gspo"):
            x = logits[..., shard].float().contiguous().requires_grad_()
            loss, metrics = fused_policy_loss(x, targets, old, adv, mask, loss_type=loss_type,
                                              process_group=dist.group.WORLD, vocab_start=start,
                                              implementation=impl)
            (grad,) = torch.autograd.grad(loss, x)
            xr = logits.clone().requires_grad_()
            ref, ref_metrics = naive_policy_loss(xr, targets, old, adv, mask, loss_type=loss_type)
            (rgrad,) = torch.autograd.grad(ref, xr)
            assert abs(loss.item() - ref.item()) < 1e-5, (impl, loss_type, loss.item(), ref.item())
            torch.testing.assert_close(grad.double(), rgrad[..., shard], rtol=1e-4, atol=1e-7)
            assert abs(metrics["kl/k3"] - ref_metrics["kl/k3"]) < 1e-5

        # the output-layer path: hidden replicated, weight sharded, dH all-reduced across the group
        for loss_type in ("sapo", "gspo"):
            h = hidden.float().clone().requires_grad_()
            w = weight[shard].float().contiguous().requires_grad_()
            loss, _ = fused_linear_policy_loss(h, w, targets, old, adv, mask, loss_type=loss_type,
                                               process_group=dist.group.WORLD, vocab_start=start,
                                               implementation=impl, chunk_bytes=5 * VOCAB * 4)
            gh, gw = torch.autograd.grad(loss, (h, w))
            hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            ref, _ = naive_linear_policy_loss(hr, wr, targets, old, adv, mask, loss_type=loss_type)
            rgh, rgw = torch.autograd.grad(ref, (hr, wr))
            assert abs(loss.item() - ref.item()) < 1e-5, (impl, loss_type)
            torch.testing.assert_close(gh.double(), rgh, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(gw.double(), rgw[shard], rtol=1e-4, atol=1e-6)

        # a target beyond the global vocab is reported on every rank
        bad = targets.clone()
        bad[1, 2] = VOCAB + 5
        try:
            fused_logprobs(logits[..., shard].float().contiguous(), bad, process_group=dist.group.WORLD,
                           vocab_start=start, implementation=impl)
        except ValueError as err:
            assert "target id out of range at rows [8]" in str(err), str(err)
        else:
            raise AssertionError("out-of-range target not reported")


def test_two_rank_vocab_parallel_matches_single_process():
    implementations = ["torch"]
    if is_available("host_kernel"):
        implementations.append("host_kernel")
    elif os.environ.get("SAPO_REQUIRE_KERNELS") == "1":
        pytest.fail("kernels/build/libsapo_kernels_host.so is missing")
    spawn_local(_worker, 2, implementations)
