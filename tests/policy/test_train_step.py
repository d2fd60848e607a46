"""The policy's training step computes the gradient of losses.policy_loss on the model users think it is: after one
step (lr 0, no clipping), every Megatron gradient shard equals the float64 gradient of the same loss through the
transformers model, mapped to Megatron's layout by the weight-conversion rules. Micro-batching, data parallel
(global normalisation), TP, EP, PP and TP + EP are each checked, for every loss type and aggregation mode that the
recipes use, with the empty padding rows the trainer adds present in the batch."""


import pytest
import torch

from megatron_sapo.policy.parallel import spawn_local

from megatron_sapo.losses import LossConfig, policy_loss
from megatron_sapo.policy.hf_weights import read_safetensors

from .harness import tiny_models

LOSS = LossConfig(loss_type="sapo", loss_agg_mode="token-mean")


def _batch(vocab, b=4, s=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.zeros(b, s - 1, dtype=torch.bool)
    for i, start in enumerate((3, 4, 2, 6)[:b]):
        mask[i, start:] = True
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])[:b]
    return ids, mask, adv, g


def _reference_grads(model_dir, ids, mask, adv, old, loss_config=LOSS):
    """Gradients of policy_loss through the transformers model (fp32 model, the loss in float64; its MoE kernels
    have no float64 path)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    logp = torch.log_softmax(hf(ids).logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    loss, _ = policy_loss(logp, old.double(), adv.double(), mask, config=loss_config)
    loss.backward()
    params = {k: p.detach() for k, p in hf.named_parameters()}
    grads = {k: p.grad.double() for k, p in hf.named_parameters()}
    # the mapping from transformers' in-memory names to the checkpoint's, checked on the weights themselves
    saved = read_safetensors(model_dir)
    assert all(torch.equal(v, saved[k]) for k, v in checkpoint_names(params).items())
    return loss.item(), checkpoint_names(grads), logp.detach()


def checkpoint_names(tensors):
    """transformers 5 keeps a MoE layer's experts fused in memory (experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I]); checkpoints, and our weight rules, name them per expert."""
    out = {}
    for key, t in tensors.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate[e], up[e]
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[key] = t
    return out


def _check_grads(policy, ref_grads):
    from megatron_sapo.policy.hf_weights import Layout, rule_for, shard
    from megatron_sapo.policy.model import padded_vocab_size

    lay = Layout(policy.arch, policy.module.config)
    if policy.arch.tie_word_embeddings:
        ref_grads = dict(ref_grads, **{"lm_head.weight": ref_grads["model.embed_tokens.weight"]})
    checked = 0
    for name, param in policy.module.named_parameters():
        rule = rule_for(name, policy.arch, lay)
        expected = shard(rule, [ref_grads[k] for k in rule.keys], policy.arch, lay,
                         padded_vocab_size(policy.arch, policy.cfg))
        got = param.main_grad.double()
        scale = expected.abs().max().item() + 1e-12
        err = (got - expected).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, (name, err, scale)
        checked += 1
    return checked


# every loss type and aggregation mode the recipes use (the paper's mode, seq-mean-token-mean, is their default)
LOSSES = [LossConfig(loss_type=t, loss_agg_mode=m) for t in ("sapo", "gspo", "grpo")
          for m in ("seq-mean-token-mean", "token-mean")]


def _with_padding_rows(ids, mask, adv, old, rows=2):
    """The batch with `rows` empty rows appended, as the trainer pads a mini-batch to dp x micro_batch_size: they
    must weigh nothing, in the token counts and in the sequence counts of the seq-mean modes alike."""
    return (torch.cat([ids, ids[:rows]]), torch.cat([mask, torch.zeros_like(mask[:rows])]),
            torch.cat([adv, torch.zeros_like(adv[:rows])]), torch.cat([old, old[:rows]]))


def _off_policy_old(model_dir, ids, mask, adv, g):
    """Old log-probs near the model's own (0.2 noise), so that every loss type has clipped and unclipped tokens."""
    _, _, ref_logp = _reference_grads(model_dir, ids, mask, adv, torch.zeros(mask.shape))
    return (ref_logp + 0.2 * torch.randn(ref_logp.shape, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("loss_type", ["sapo", "gspo", "grpo"])
def test_single_process_micro_batches_match_reference(tmp_path, loss_type):
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    tiny_models().build("qwen3_moe", tmp_path)
    policy = Policy(PolicyConfig(model_path=str(tmp_path), micro_batch_size=2, lr=0.0, clip_grad=0.0,
                                 moe_aux_loss_coeff=0.0))  # the reference has no auxiliary loss
    ids, mask, adv, g = _batch(300)
    ref_logp = _reference_grads(tmp_path, ids, mask, adv, torch.zeros(4, 9))[2]
    torch.testing.assert_close(policy.log_probs(ids).double(), ref_logp, rtol=0, atol=2e-5)
    old = _off_policy_old(tmp_path, ids, mask, adv, g)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        loss_config = LossConfig(loss_type=loss_type, loss_agg_mode=mode)
        ref_loss, ref_grads, _ = _reference_grads(tmp_path, ids, mask, adv, old, loss_config)
        padded = _with_padding_rows(ids, mask, adv, old)
        metrics = policy.train_step(PolicyBatch(*padded[:3], old_log_probs=padded[3]), loss_config)
        assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-7), mode
        assert metrics["skipped"] == 0.0 and metrics["grad_norm"] > 0 and metrics["count/tokens"] == mask.sum()
        assert metrics["count/seqs"] == 4  # the padding rows are no sequences
        assert 0 < metrics["ratio/min"] < 1 < metrics["ratio/max"] and metrics["moe/load_max_over_mean"] >= 1
        assert "moe/load_balancing_loss" not in metrics  # the auxiliary loss is off here
        assert _check_grads(policy, ref_grads) > 20


LAYOUTS = [dict(), dict(tensor_model_parallel_size=2), dict(expert_model_parallel_size=2),
           dict(pipeline_model_parallel_size=2),
           dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1)]


def _worker(rank, model_dir):
    from megatron.core import parallel_state as ps

    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    ids, mask, adv, g = _batch(300)
    old = _off_policy_old(model_dir, ids, mask, adv, g)
    references = [_reference_grads(model_dir, ids, mask, adv, old, loss)[:2] for loss in LOSSES]
    p_ids, p_mask, p_adv, p_old = _with_padding_rows(ids, mask, adv, old)
    for layout in LAYOUTS:
        policy = Policy(PolicyConfig(model_path=model_dir, micro_batch_size=1, lr=0.0, clip_grad=0.0,
                                     moe_aux_loss_coeff=0.0, **layout))
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        rows = slice(dp_rank, None, dp)  # each data-parallel rank every dp-th row, as the trainer shares them out
        print("layout", layout, flush=True)
        for loss, (ref_loss, ref_grads) in zip(LOSSES, references):
            metrics = policy.train_step(PolicyBatch(p_ids[rows], p_mask[rows], p_adv[rows],
                                                    old_log_probs=p_old[rows]), loss)
            assert abs(metrics["loss"] - ref_loss) <= 1e-5 * abs(ref_loss) + 1e-7, \
                (layout, loss.loss_type, loss.loss_agg_mode, metrics["loss"], ref_loss)
            assert _check_grads(policy, ref_grads) > 0, (layout, loss.loss_type, loss.loss_agg_mode)
        if not layout:  # DP = 2, and the second rank's rows hold no response token: it contributes nothing
            half = mask.clone()
            half[1::2] = False
            half_loss, half_grads, _ = _reference_grads(model_dir, ids, half, adv, old)
            rows = slice(dp_rank, 4, dp)
            metrics = policy.train_step(PolicyBatch(ids[rows], half[rows], adv[rows], old_log_probs=old[rows]), LOSS)
            assert abs(metrics["loss"] - half_loss) <= 1e-5 * abs(half_loss) + 1e-7, (metrics["loss"], half_loss)
            assert metrics["skipped"] == 0.0 and _check_grads(policy, half_grads) > 0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_data_tensor_expert_pipeline_parallel_match_reference(tmp_path):
    """sapo, gspo, grpo x seq-mean-token-mean, token-mean, under DP=2, TP=2, EP=2, PP=2 and TP=2 + EP=2, with
    padding rows: loss and every gradient shard against the float64 transformers reference."""
    tiny_models().build("qwen3_moe", tmp_path)
    spawn_local(_worker, 2, str(tmp_path))


def test_micro_batch_without_response_tokens_contributes_nothing(tmp_path):
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    tiny_models().build("qwen3_moe", tmp_path)
    policy = Policy(PolicyConfig(model_path=str(tmp_path), micro_batch_size=2, lr=0.0, clip_grad=0.0,
                                 moe_aux_loss_coeff=0.0))
    ids, mask, adv, g = _batch(300)
    mask[:2] = False  # the first micro-batch has no response token
    old = -torch.rand(4, 9, generator=g) * 6
    ref_loss, ref_grads, _ = _reference_grads(tmp_path, ids, mask, adv, old)
    metrics = policy.train_step(PolicyBatch(ids, mask, adv, old_log_probs=old), LOSS)
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5) and metrics["count/tokens"] == mask.sum()
    assert _check_grads(policy, ref_grads) > 20


def test_non_finite_step_is_skipped_not_applied(tmp_path):
    """A weight turned NaN (as an overflow would) makes the hidden states and the loss non-finite: the step reports
    skipped = 1 and a NaN loss, raises nothing, and changes no parameter; NaN old log-probs do the same."""
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    tiny_models().build("qwen3_moe", tmp_path)
    policy = Policy(PolicyConfig(model_path=str(tmp_path), micro_batch_size=2, lr=1e-2))
    ids, mask, adv, _ = _batch(300)
    old = policy.log_probs(ids)
    bad_old = old.clone()
    bad_old[1, 5] = float("nan")
    before = {n: p.detach().clone() for n, p in policy.module.named_parameters()}
    metrics = policy.train_step(PolicyBatch(ids, mask, adv, old_log_probs=bad_old), LOSS)
    assert metrics["skipped"] == 1.0 and metrics["loss"] != metrics["loss"] and policy.step == 0
    assert all(torch.equal(before[n], p) for n, p in policy.module.named_parameters())

    proj = policy.module.decoder.layers[0].self_attention.linear_proj.weight
    with torch.no_grad():
        proj[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in policy.module.named_parameters()}
    assert policy.log_probs(ids).isnan().all()
    metrics = policy.train_step(PolicyBatch(ids, mask, adv, old_log_probs=old), LOSS)
    assert metrics["skipped"] == 1.0 and policy.step == 0
    for name, p in policy.module.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, equal_nan=True)
    with torch.no_grad():  # repaired, the next step is applied
        proj[0, 0] = 0.0
    metrics = policy.train_step(PolicyBatch(ids, mask, adv, old_log_probs=old), LOSS)
    assert metrics["skipped"] == 0.0 and policy.step == 1


def test_lr_schedule_clipping_and_aux_loss(tmp_path):
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    tiny_models().build("qwen3_moe", tmp_path, router_aux_loss_coef=0.01)
    policy = Policy(PolicyConfig(model_path=str(tmp_path), micro_batch_size=2, lr=1e-2, min_lr=1e-3,
                                 lr_warmup_steps=2, lr_decay_steps=4, lr_decay_style="linear", clip_grad=1e-3))
    ids, mask, adv, _ = _batch(300)
    before = [p.detach().clone() for p in policy.module.parameters()]
    lrs, aux = [], []
    for _ in range(5):
        m = policy.train_step(PolicyBatch(ids, mask, adv), LOSS)
        lrs.append(m["lr"])
        aux.append(m["moe/load_balancing_loss"])
        # the reported norm is before clipping; the gradient the optimizer applied was scaled to clip_grad
        applied = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in policy.module.parameters()))
        assert m["grad_norm"] > 1e-3 and applied.item() == pytest.approx(1e-3, rel=1e-4)
    # Megatron's scheduler: linear warmup over 2 steps, then linear decay to min_lr at step 4
    assert lrs == pytest.approx([5e-3, 1e-2, 5.5e-3, 1e-3, 1e-3])
    assert all(a > 0.9 for a in aux)  # the unscaled load-balancing loss is ~1 for balanced routing
    # an Adam update moves a weight by at most about lr per step
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(policy.module.parameters(), before))
    assert 0 < moved <= sum(lrs) + 1e-6


def test_distributed_optimizer_without_cuda_is_named(tmp_path):
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy

    with pytest.raises(ValueError, match="use_distributed_optimizer needs CUDA"):
        Policy(PolicyConfig(model_path=str(tmp_path), use_distributed_optimizer=True))


def test_padding_stays_out_of_the_moe_auxiliary_loss(tmp_path):
    """What pads a batch (the tokens after a row's last response token, and the empty rows the trainer appends)
    is no part of any sequence: with the load-balancing loss on, changing the padding's token ids changes neither
    the loss, nor any gradient, nor the logged auxiliary loss and expert loads."""
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    tiny_models().build("qwen3_moe", tmp_path, router_aux_loss_coef=0.01)
    policy = Policy(PolicyConfig(model_path=str(tmp_path), micro_batch_size=6, lr=0.0, clip_grad=0.0))
    ids, mask, adv, g = _batch(300)
    mask[1, 6:] = False  # row 1 predicts tokens 5 and 6 only: tokens 7 to 9 are right padding
    old = -torch.rand(4, 9, generator=g) * 6
    ids, mask, adv, old = _with_padding_rows(ids, mask, adv, old)
    padding = Policy.sequence_padding(mask)
    assert padding.sum() == 3 + 2 * 10 and padding[4:].all() and padding[1, 7:].all()
    results = []
    for seed in (1, 2):
        other = torch.randint(0, 300, ids.shape, generator=torch.Generator().manual_seed(seed))
        metrics = policy.train_step(PolicyBatch(torch.where(padding, other, ids), mask, adv, old_log_probs=old), LOSS)
        results.append((metrics, {n: p.main_grad.clone() for n, p in policy.module.named_parameters()}))
    (first, first_grads), (second, second_grads) = results
    assert first["moe/load_balancing_loss"] > 0.5
    for key in ("loss", "grad_norm", "moe/load_balancing_loss", "moe/load_max_over_mean", "moe/load_min_over_mean"):
        assert second[key] == pytest.approx(first[key], rel=1e-6), key
    for name, grad in first_grads.items():
        torch.testing.assert_close(second_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def _tp_pp_worker(rank, model_dir, expected):
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    batch = torch.load(expected, weights_only=False)
    policy = Policy(PolicyConfig(model_path=model_dir, micro_batch_size=2, lr=0.0, clip_grad=0.0,
                                 tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    metrics = policy.train_step(PolicyBatch(**batch["batch"]), LOSS)
    for key, value in batch["metrics"].items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), (key, metrics[key], value)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_tensor_and_pipeline_parallel_with_padding_match_one_process(tmp_path):
    """TP=2 x PP=2 on 4 processes (sequence parallelism on the second stage too, where Megatron does not split the
    padding mask itself), with the load-balancing loss on and padding rows: loss, gradient norm and the auxiliary
    loss equal one process's."""
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    tiny_models().build("qwen3_moe", tmp_path / "model", router_aux_loss_coef=0.01)
    ids, mask, adv, g = _batch(300, s=11)  # odd length: the sequence-parallel padding too
    mask[1, 6:] = False
    batch = dict(zip(("input_ids", "response_mask", "advantages", "old_log_probs"),
                     _with_padding_rows(ids, mask, adv, -torch.rand(4, 10, generator=g) * 6)))
    policy = Policy(PolicyConfig(model_path=str(tmp_path / "model"), micro_batch_size=2, lr=0.0, clip_grad=0.0))
    metrics = policy.train_step(PolicyBatch(**batch), LOSS)
    assert metrics["skipped"] == 0.0  # the last micro-batch holds padding rows only: no NaN auxiliary loss
    expected = {k: metrics[k] for k in ("loss", "grad_norm", "moe/load_balancing_loss", "count/tokens")}
    torch.save({"batch": batch, "metrics": expected}, tmp_path / "expected.pt")
    spawn_local(_tp_pp_worker, 4, str(tmp_path / "model"), str(tmp_path / "expected.pt"))
