"""MoE routing replay on Megatron-Core's RouterReplay (policy/routing.py), real Megatron-Core.

R2 on one process and on two (EP=2, PP=2, TP=2 with sequence parallelism), two micro-batches with a padding row:
the experts every router uses in the training forwards (read back from the routers' own output) equal those its
old-log-prob forward picked, in the first update and in a later one after the weights moved; the first update's
ratios are exactly 1 (within float32 rounding under TP), and routing/replay_agree is 1 there. A near-tie model
shows what replay is for. Engine routes per row go to each rank's token order (sequence chunks, stages) exactly,
and routes that do not fit are named errors."""

import pytest
import torch

from megatron_sapo.policy.parallel import spawn_local
from megatron_sapo.policy.routing import UNKNOWN, check_routes, native_routes, token_order

from .harness import tiny_models

LAYOUTS = {"ep2": dict(expert_model_parallel_size=2), "pp2": dict(pipeline_model_parallel_size=2),
           "tp2": dict(tensor_model_parallel_size=2)}


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4, 11), generator=g)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[0, 3:], mask[1, 4:9], mask[2, 2:] = True, True, True  # row 3: an empty (padding) row
    return ids, mask, torch.tensor([1.0, -1.0, 0.5, 0.0])


def _used_routes(policy):
    """A hook on every router keeping the experts it actually used (its routing map), per call."""
    used = []

    def keep(module, inputs, output):
        used.append(output[1].nonzero()[:, 1].view(-1, module.topk).sort(-1).values.to(torch.int16))
    for router in policy.routes.routers:
        router.register_forward_hook(keep)
    return used


def _r2_checks(model_dir, layout):
    from megatron_sapo.losses import LossConfig
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    policy = Policy(PolicyConfig(model_path=model_dir, micro_batch_size=2, lr=0.05, routing_replay="r2", **layout))
    used = _used_routes(policy)
    ids, mask, adv = _batch(policy.arch.vocab_size)
    loss = LossConfig(loss_type="grpo")
    for update in range(3):
        old, routes = policy.old_log_probs(ids)
        used.clear()
        metrics = policy.train_step(PolicyBatch(ids, mask, adv, old_log_probs=old, old_routes=routes), loss)
        flat = [r for micro in routes for r in micro]
        assert len(used) == len(flat) > 0, (layout, len(used), len(flat))
        for got, recorded in zip(used, flat):
            assert torch.equal(got, recorded), (layout, update)
        if update == 0:
            # exact; with TP the log-prob and the loss ops reduce over the vocab shards in other orders (float32
            # rounding, with or without replay)
            tol = 1e-6 if layout.get("tensor_model_parallel_size", 1) > 1 else 0.0
            assert abs(metrics["ratio/min"] - 1) <= tol and abs(metrics["ratio/max"] - 1) <= tol, (layout, metrics)
            assert metrics["routing/replay_agree"] == 1.0, metrics
        assert 0 <= metrics["routing/replay_agree_min_layer"] <= metrics["routing/replay_agree"] <= 1


def test_r2_replays_the_old_forwards_routes_on_one_process(tmp_path):
    tiny_models().build("qwen3_moe", tmp_path / "m", num_experts=8)
    from megatron_sapo.policy import parallel

    parallel.init_distributed()
    _r2_checks(str(tmp_path / "m"), {})


def _worker(rank, model_dir):
    for layout in LAYOUTS.values():
        _r2_checks(model_dir, layout)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_r2_replays_under_ep_pp_and_tp_with_sequence_parallelism(tmp_path):
    tiny_models().build("qwen3_moe", tmp_path / "m", num_experts=8)
    spawn_local(_worker, 2, str(tmp_path / "m"))


def test_engine_routes_reach_each_rank_in_its_token_order():
    b, s, layers, k = 2, 5, 3, 2
    rows = torch.arange(b * s * layers * k, dtype=torch.int16).view(b, s, layers, k)
    # TP=2 with sequence parallelism: the sequence is padded to 6, rank 1 routes positions 3..5 of both rows
    routes = native_routes([rows], [0, 2], tp=2, tp_rank=1, sequence_parallel=True)
    assert len(routes) == 1 and len(routes[0]) == 2
    expected = [rows[0, 3], rows[1, 3], rows[0, 4], rows[1, 4]]  # [s, b] order
    for j, layer in enumerate([0, 2]):
        got = routes[0][j]
        assert got.shape == (6, k)
        assert all(torch.equal(got[t], e[layer]) for t, e in enumerate(expected))
        assert (got[4:] == UNKNOWN).all()  # position 5 is padding
    mask = token_order(torch.ones(2, 5, dtype=torch.bool), 6, 2, 0, True, False)
    assert mask.tolist() == [True] * 6


def test_routes_that_do_not_fit_are_named():
    good = torch.zeros(2, 5, 3, 2, dtype=torch.int16)
    fit = dict(rows=2, seq_len=5, num_layers=3, topk=2, num_experts=4)
    check_routes(good, **fit)
    for bad, message in [(torch.zeros(2, 4, 3, 2), "tokens 4 vs 5"), (torch.zeros(2, 5, 2, 2), "layers 2 vs 3"),
                         (torch.zeros(2, 5, 3, 1), "top-k 1 vs 2"), (torch.zeros(3, 5, 3, 2), "rows 3 vs 2"),
                         (torch.full((2, 5, 3, 2), 4), "expert 4, outside 0..3")]:
        with pytest.raises(ValueError, match=message):
            check_routes(bad, **fit)


def near_tie_model(folder, noise: float = 1e-7, num_experts: int = 8):
    """A tiny Qwen3-MoE (top-2) whose routers give every expert almost the same logit (one shared row
    plus `noise`): which two experts a token takes then turns on differences far below what an update, or another
    implementation's float rounding, changes."""
    from safetensors.torch import load_file, save_file

    tiny_models().build("qwen3_moe", folder, num_experts=num_experts)
    tensors = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if name.endswith("mlp.gate.weight"):
            tensors[name] = (5 * t[:1] + noise * torch.randn(t.shape, generator=g)).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_near_tie_routing_drifts_and_replay_holds_it(tmp_path):
    """The near-tie model, a batch sampled by the embedded engine (with its routes), four mini-batch updates at a
    learning rate that barely moves the weights: without replay the routers' picks drift (routing/replay_agree far
    below 1) and the ratios spread; R2 holds the routes, and the ratios stay within float noise of what the tiny
    update explains; R3 makes the trainer's old log-probs the engine's (mismatch ~1e-7, against ~1e-3 without), the
    engine and the trainer agreeing on only about half of the top-2 sets by themselves."""
    from megatron_sapo.config import load_config
    from megatron_sapo.loop.learner import Learner
    from megatron_sapo.policy import parallel
    from megatron_sapo.policy.policy import Policy
    from megatron_sapo.rollout import SamplingParams
    from megatron_sapo.rollout.batch import collate
    from megatron_sapo.rollout.embedded import EmbeddedEngine

    near_tie_model(tmp_path / "m")
    parallel.init_distributed()
    engine = EmbeddedEngine(tmp_path / "m")
    groups = engine.generate(["12:", "hello", "3+4=", "abc"], 4, SamplingParams(max_new_tokens=12, seed=1),
                             return_routes=True)
    completions = [c for group in groups for c in group]
    advantages = torch.randn(16, generator=torch.Generator().manual_seed(1))
    batch = collate(completions, advantages, engine.tokenizer.pad_token_id)
    assert batch.routes is not None and (batch.routes[:, :, 0] >= 0).any()
    got = {}
    for mode in ("none", "r2", "r3"):
        cfg = load_config(None, [f"policy.model_path={tmp_path / 'm'}", f"policy.routing_replay={mode}",
                                 "policy.lr=1e-6", "trainer.mini_batches=4", "policy.micro_batch_size=2",
                                 "loss.loss_type=grpo"])
        got[mode] = Learner(Policy(cfg.policy), cfg).update(batch, 0)
    none, r2, r3 = got["none"], got["r2"], got["r3"]
    for m in got.values():
        assert 0 <= m["routing/replay_agree_min_layer"] <= m["routing/replay_agree"] < 0.6, m
        assert 0.2 < m["routing/engine_agree"] < 0.8, m
    spread = {mode: m["ratio/max"] - m["ratio/min"] for mode, m in got.items()}
    assert spread["r2"] < spread["none"] / 10 and spread["r3"] < spread["none"] / 10, spread
    assert r3["mismatch/abs_diff_mean"] < 1e-5 < 1e-4 < none["mismatch/abs_diff_mean"], (r3, none)
    assert r2["mismatch/abs_diff_mean"] == none["mismatch/abs_diff_mean"]  # r2 leaves the old forward alone


def test_replay_on_a_model_without_experts_is_named(tmp_path):
    from megatron_sapo.policy import parallel
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy

    tiny_models().build("qwen3", tmp_path / "dense")
    parallel.init_distributed()
    with pytest.raises(ValueError, match="policy.routing_replay=r2 replays MoE routes, but .* has no MoE layers"):
        Policy(PolicyConfig(model_path=str(tmp_path / "dense"), routing_replay="r2"))
