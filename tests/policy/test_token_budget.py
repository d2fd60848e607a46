"""Token-budget micro-batches (policy.max_tokens_per_micro_batch, megatron_sapo/batching), padded or packed
(policy.pack_sequences), give the RL step of the padded path: the same old log-probs on the response tokens (1e-6),
loss, gradient norm and every gradient shard within 1e-5 relative, for sapo, gspo and grpo in every aggregation
mode, on a batch of uneven lengths with empty rows; on one process and under DP=2, TP=2 with sequence parallelism,
EP=2 (aligned micro-batch shapes for the allgather dispatcher), PP=2 (Megatron's variable-sequence-length p2p) and
TP=2 x PP=2. R3 replay of random engine routes (which change the loss wherever a route lands on the wrong token)
gives the same step too, and so does full activation recompute under R2 / R3 with PP=2. The learner-level test takes
real updates (lr > 0, a row longer than the budget) and compares the updated weights, with R2 replay.
Mutations that fail here (checked by hand): attention seeing across packed rows, RoPE boundaries off by one token,
the loss's rows gathered one position off, a micro-batch one position short, rows' advantages or routes swapped,
Dr.GRPO's constant taken from the micro-batch, unaligned shapes under EP (gloo aborts). (Positions that do not
restart at all are invisible to RoPE, whose scores depend only on the distance within a row, once attention keeps to
each row.)"""

import pytest
import torch

from megatron_sapo.losses import LossConfig
from megatron_sapo.policy.parallel import spawn_local

from .harness import tiny_models

LOSSES = [LossConfig(loss_type=t, loss_agg_mode=m) for t in ("sapo", "gspo", "grpo")
          for m in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")]
# the engine-mismatch corrections, whose sequence levels read each row's tokens together
CORRECTED = [LossConfig(loss_type="sapo", rollout_correction="tis", rollout_correction_level="sequence"),
             LossConfig(loss_type="grpo", rollout_correction="mis", rollout_correction_level="geometric")]
# (prompt tokens, response tokens) per row: lengths 3..17 of 17 positions, two rows without a response
ROWS = [(3, 14), (2, 3), (4, 1), (2, 0), (5, 10), (3, 5), (2, 13), (6, 2), (3, 0), (2, 6), (4, 9)]
BUDGET = 24  # rows of 15 and 17 tokens: micro-batches of one row, the short ones several to a micro-batch
SEQ = 18


def uneven_batch(vocab=300, seed=0):
    """[11, 18] ids with the rows' responses where ROWS puts them; advantages and ids random."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(ROWS), SEQ), generator=g)
    mask = torch.zeros(len(ROWS), SEQ - 1, dtype=torch.bool)
    for i, (prompt, response) in enumerate(ROWS):
        mask[i, prompt - 1:prompt - 1 + response] = True
    return ids, mask, torch.randn(len(ROWS), generator=g), g


def engine_routes(rows, seq, layers, topk, experts, seed=1):
    """Random routes [rows, seq, layers, k] of k distinct experts per token, sorted (as engines report them)."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.rand(rows, seq, layers, experts, generator=g).argsort(-1)[..., :topk]
    return picks.sort(-1).values.to(torch.int16)


def _padded_share(tensors, dp, dp_rank, mbs=1):
    """The padded path's share of a rank: empty rows appended to a multiple of dp x mbs, every dp-th row."""
    extra = -tensors[0].shape[0] % (dp * mbs)
    out = []
    for t in tensors:
        fill = -1 if t.dtype == torch.int16 else 0
        t = torch.cat([t, t.new_full((extra, *t.shape[1:]), fill)]) if extra else t
        out.append(t[dp_rank::dp])
    return out


def _grads(policy):
    return {name: p.main_grad.detach().clone() for name, p in policy.module.named_parameters()}


def _assert_same_step(a, b, grads_a, grads_b, what):
    for key in ("loss", "grad_norm", "count/tokens", "count/seqs", "mismatch/abs_diff_mean", "mismatch/weight_mean"):
        if key not in a and key not in b:  # (the mismatch metrics come with the engine's log-probs)
            continue
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), (what, key, a[key], b[key])
    for name, grad in grads_a.items():
        scale = grad.abs().max().item()
        err = (grads_b[name] - grad).abs().max().item()
        assert err <= 1e-5 * scale + 1e-9, (what, name, err, scale)


def compare_paths(model_dir, layout, losses=LOSSES):
    """On this rank: the padded path, the budgeted one and the packed one, for every loss; then R3 with random
    engine routes."""
    from megatron.core import parallel_state as ps

    from megatron_sapo.batching import plan_micro_batches, row_lengths
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    ids, mask, adv, g = uneven_batch()
    base = dict(model_path=model_dir, micro_batch_size=1, lr=0.0, clip_grad=0.0, moe_aux_loss_coeff=0.0, **layout)
    policy = Policy(PolicyConfig(**base, max_tokens_per_micro_batch=BUDGET))
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    shares = {}  # path -> (this rank's rows, its micro-batches)
    for path in ("budget", "packed"):
        plans, too_long = plan_micro_batches(row_lengths(mask), dp=dp, max_tokens=BUDGET,
                                             **dict(policy.plan_layout(), packed=path == "packed"))
        assert too_long == [] and max(mb.computed for p in plans for mb in p.micro_batches) <= BUDGET
        assert len({len(p) for p in plans}) == 1 and len(plans[rank]) > 1
        assert all(mb.packed == (path == "packed") for p in plans for mb in p.micro_batches if mb.rows)
        shares[path] = torch.tensor(plans[rank].rows, dtype=torch.long), plans[rank].micro_batches
    assert any(len(mb.rows) > 1 for mb in shares["packed"][1])  # rows do share a packed row

    # old log-probs: each path's forward against the full-width one of every row (the same rows on every rank:
    # the allgather dispatcher's shapes agree)
    reference = policy.log_probs(ids)
    for sel, micro in shares.values():
        old_mine, _ = policy.old_log_probs(ids[sel], micro_batches=micro)
        assert torch.allclose(old_mine[mask[sel]], reference[sel][mask[sel]], rtol=0, atol=1e-6)
        assert (old_mine[~mask[sel]] == 0).any()  # positions past a row's length are not computed
    old = reference + 0.2 * torch.randn(mask.shape, generator=g)  # near the model's own: clipped and unclipped
    old[~mask] = 0.0
    engine = (old + 0.1 * torch.randn(mask.shape, generator=g)) * mask  # the engine's log-probs: mismatch metrics
    p_ids, p_mask, p_adv, p_old, p_engine = _padded_share([ids, mask, adv, old, engine], dp, rank)
    for loss in losses:
        a = policy.train_step(PolicyBatch(p_ids, p_mask, p_adv, old_log_probs=p_old, rollout_log_probs=p_engine),
                              loss)
        grads_a = _grads(policy)
        for path, (sel, micro) in shares.items():
            what = (layout, path, loss.loss_type, loss.loss_agg_mode, loss.rollout_correction)
            b = policy.train_step(PolicyBatch(ids[sel], mask[sel], adv[sel], old_log_probs=old[sel],
                                              rollout_log_probs=engine[sel], micro_batches=micro), loss)
            assert a["skipped"] == b["skipped"] == 0.0, what
            _assert_same_step(a, b, grads_a, _grads(policy), what)
    del policy

    # R3: the engine's (random) routes replayed in both forwards of every path
    policy = Policy(PolicyConfig(**base, routing_replay="r3", max_tokens_per_micro_batch=BUDGET))
    arch = policy.arch
    routes = engine_routes(len(ROWS), SEQ, arch.num_layers, arch.moe_topk, arch.num_experts)
    for r in range(len(ROWS)):  # the engine never fed a row's last token, nor padding
        routes[r, sum(ROWS[r]) - 1:] = -1
    p_routes = _padded_share([routes], dp, rank)[0]
    loss = LossConfig(loss_type="sapo", loss_agg_mode="token-mean")
    out = []
    for batch_ids, batch_mask, batch_adv, batch_old, batch_routes, plan in [
            (p_ids, p_mask, p_adv, p_old, p_routes, None)] + [
            (ids[sel], mask[sel], adv[sel], old[sel], routes[sel], micro) for sel, micro in shares.values()]:
        engine = policy.engine_routes(batch_routes, batch_ids, plan)
        replayed, own = policy.old_log_probs(batch_ids, replay=engine, micro_batches=plan)
        metrics = policy.train_step(PolicyBatch(batch_ids, batch_mask, batch_adv, old_log_probs=batch_old,
                                                old_routes=own, engine_routes=engine, micro_batches=plan), loss)
        out.append((metrics, _grads(policy), replayed[batch_mask].sum()))
    a, grads_a, old_a = out[0]
    for path, (b, grads_b, old_b) in zip(shares, out[1:]):
        _assert_same_step(a, b, grads_a, grads_b, (layout, path, "r3"))
        if dp == 1:  # the same rows on this rank: their replayed old log-probs agree
            assert old_b.item() == pytest.approx(old_a.item(), rel=1e-6), path
        for key in ("routing/engine_agree", "routing/replay_agree"):  # per token: routes on the same tokens
            assert b[key] == pytest.approx(a[key], abs=1e-12), (layout, path, key, a[key], b[key])
    assert a["routing/engine_agree"] < 0.5  # random routes: what the routers pick themselves differs


def compare_recompute_under_replay(model_dir, layout):
    """Full activation recompute re-runs each MoE router inside the backward: under R2 and R3 it must replay the
    routes of the micro-batch being recomputed (under pipeline parallelism, 1F1B has run later micro-batches'
    forwards by then), and its picks must not overwrite those of the forward. The step equals the one without
    recompute: loss, gradients, the routing agreement."""
    from megatron.core import parallel_state as ps

    from megatron_sapo.batching import plan_micro_batches, row_lengths
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    ids, mask, adv, g = uneven_batch()
    old = -torch.rand(mask.shape, generator=g) * mask
    loss = LossConfig(loss_type="grpo", loss_agg_mode="seq-mean-token-mean")
    for replay in ("r2", "r3"):
        out = []
        for recompute in ("none", "full"):
            policy = Policy(PolicyConfig(model_path=model_dir, lr=0.0, clip_grad=0.0, moe_aux_loss_coeff=0.0,
                                         max_tokens_per_micro_batch=BUDGET, routing_replay=replay,
                                         recompute=recompute, **layout))
            dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
            plans, _ = plan_micro_batches(row_lengths(mask), dp=dp, max_tokens=BUDGET, **policy.plan_layout())
            sel, micro = torch.tensor(plans[rank].rows, dtype=torch.long), plans[rank].micro_batches
            arch = policy.arch
            routes = engine_routes(len(ROWS), SEQ, arch.num_layers, arch.moe_topk, arch.num_experts)
            engine = policy.engine_routes(routes[sel], ids[sel], micro)
            _, own = policy.old_log_probs(ids[sel], replay=engine if replay == "r3" else None, micro_batches=micro)
            metrics = policy.train_step(PolicyBatch(ids[sel], mask[sel], adv[sel], old_log_probs=old[sel],
                                                    old_routes=own, engine_routes=engine, micro_batches=micro), loss)
            out.append((metrics, _grads(policy)))
            del policy
        (a, grads_a), (b, grads_b) = out
        _assert_same_step(a, b, grads_a, grads_b, (layout, replay, "recompute"))
        assert b["routing/replay_agree"] == a["routing/replay_agree"], (replay, a, b)


def test_budget_matches_padded_path_on_one_process(tmp_path):
    from megatron_sapo.policy import parallel

    tiny_models().build("qwen3_moe", tmp_path, num_experts=8)
    parallel.init_distributed()
    compare_paths(str(tmp_path), {}, losses=LOSSES + CORRECTED)


LAYOUTS = [dict(), dict(tensor_model_parallel_size=2), dict(expert_model_parallel_size=2),
           dict(pipeline_model_parallel_size=2)]


def _worker(rank, model_dir):
    for layout in LAYOUTS:
        print("layout", layout, flush=True)
        compare_paths(model_dir, layout)
    compare_recompute_under_replay(model_dir, dict(pipeline_model_parallel_size=2))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_budget_matches_padded_path_under_dp_tp_ep_pp(tmp_path):
    tiny_models().build("qwen3_moe", tmp_path, num_experts=8)
    spawn_local(_worker, 2, str(tmp_path))


def _tp_pp_worker(rank, model_dir):
    compare_paths(model_dir, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
                  losses=[LOSSES[1], LOSSES[-1]])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_budget_matches_padded_path_under_tp2_pp2(tmp_path):
    """TP=2 x PP=2 on 4 processes: sequence parallelism and variable-length p2p together (two loss settings)."""
    tiny_models().build("qwen3_moe", tmp_path, num_experts=8)
    spawn_local(_tp_pp_worker, 4, str(tmp_path))


def test_learner_update_with_a_budget_takes_the_padded_step(tmp_path, caplog):
    """Two mini-batch updates at lr 1e-3 with R2 replay, through the learner (planning, shards, old log-probs,
    updates): the budgeted step's and the packed step's loss, gradient norm and updated weights equal the padded
    path's; the plan's numbers are those of the batch (real tokens over computed positions, by hand for the padded
    path); a row longer than the budget is said once per learner, however many updates meet it. (adam_eps 1e-5:
    Adam's first steps are about lr x sign(gradient), which would turn the float rounding of a gradient element near
    zero into a whole step.)"""
    from megatron_sapo.config import load_config
    from megatron_sapo.loop.learner import Learner
    from megatron_sapo.policy import parallel
    from megatron_sapo.policy.policy import Policy
    from megatron_sapo.rollout.batch import RolloutBatch

    tiny_models().build("qwen3_moe", tmp_path / "m", num_experts=8)
    parallel.init_distributed()
    ids, mask, adv, g = uneven_batch()
    batch = RolloutBatch(ids, mask, -torch.rand(mask.shape, generator=g) * mask, adv)
    got = {}
    for budget, packed in ((0, False), (16, False), (16, True)):  # the longest row has 17 tokens
        cfg = load_config(None, [f"policy.model_path={tmp_path / 'm'}", "policy.lr=1e-3", "policy.routing_replay=r2",
                                 "policy.micro_batch_size=1", f"policy.max_tokens_per_micro_batch={budget}",
                                 f"policy.pack_sequences={str(packed).lower()}",
                                 "policy.moe_aux_loss_coeff=0.0", "policy.adam_eps=1e-5", "trainer.mini_batches=2",
                                 "loss.loss_type=sapo"])
        policy = Policy(cfg.policy)
        learner = Learner(policy, cfg)
        metrics = learner.update(batch, 0)
        learner.update(batch, 1)  # the long row again: no second warning
        got[budget, packed] = metrics, policy.hf_state_dict()
    padded, w_padded = got[0, False]
    for key in ("train/loss", "train/grad_norm", "count/tokens", "ratio/mean"):
        for path in ((16, False), (16, True)):
            assert got[path][0][key] == pytest.approx(padded[key], rel=1e-5), (key, path, padded[key], got[path][0])
    for path in ((16, False), (16, True)):
        metrics, weights = got[path]
        # R2: each update replays its own old forward's routes; the second's routers drift by themselves alike
        assert metrics["routing/replay_agree"] == padded["routing/replay_agree"] < 1.0, (padded, metrics)
        for name, w in w_padded.items():
            err = (weights[name] - w).abs().max().item()
            assert err <= 1e-5 * w.abs().max().item(), (path, name, err, w.abs().max().item())
    moved = max((w_padded[n] - w).abs().max().item() for n, w in read_weights(tmp_path / "m").items())
    assert moved > 1e-4  # the updates did change the weights
    real = sum(p + r for p, r in ROWS if r)
    budgeted, packed = got[16, False][0], got[16, True][0]
    assert padded["train/token_efficiency"] == pytest.approx(real / (len(ROWS) * SEQ))
    assert budgeted["train/token_efficiency"] > 0.75 > 2 * padded["train/token_efficiency"] - 0.2
    assert packed["train/token_efficiency"] == 1.0  # no padding at all (one process, no TP rounding)
    assert padded["train/micro_batches"] == len(ROWS) > budgeted["train/micro_batches"] \
        >= packed["train/micro_batches"]
    assert padded["train/dp_token_imbalance"] == budgeted["train/dp_token_imbalance"] == 1.0  # one rank
    assert caplog.text.count("longer than policy.max_tokens_per_micro_batch=16") == 2  # once per learner


def read_weights(model_dir):
    from megatron_sapo.policy.hf_weights import read_safetensors

    return read_safetensors(model_dir)
