import math

import pytest
import torch

from megatron_sapo.losses import LOSS_TYPES, METRICS, REDUCTIONS, LossConfig, Metric, policy_loss, reduce_metrics, \
    sapo_gate_weight

from .batches import ragged_batch


def _ok():
    return ragged_batch(41, pad=0.0)


def test_bad_tensors_are_named():
    lp, old, adv, mask = _ok()
    cases = [
        ((lp, old[:, :-1], adv, mask), "old_log_probs shape \\(5, 8\\) does not match log_probs shape \\(5, 9\\)"),
        ((lp, old, adv, mask[:4]), "response_mask shape"),
        ((lp, old, adv[:3], mask), "advantages must be per sequence \\[5\\] or per token \\(5, 9\\)"),
        ((lp[0], old[0], adv, mask[0]), "log_probs must be \\[batch, seq_len\\]"),
        ((lp, old, adv, mask.long() * 2), "response_mask holds values other than 0 and 1"),
        ((lp, old, adv, torch.zeros_like(mask)), "response_mask has no response tokens"),
        ((lp, old.long(), adv, mask), "old_log_probs must be a floating-point tensor"),
        ((lp, old.tolist(), adv, mask), "old_log_probs must be a torch.Tensor"),
        ((lp[:, :0], old[:, :0], adv, mask[:, :0]), "log_probs is empty"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            policy_loss(*args)


@pytest.mark.parametrize("name,value", [("lp", float("nan")), ("old", float("inf")), ("adv", float("nan"))])
def test_non_finite_values_at_response_tokens_are_named(name, value):
    lp, old, adv, mask = _ok()
    tensors = {"lp": lp.detach().clone(), "old": old.clone(), "adv": adv.clone()}
    tensors[name][0] = value  # row 0 has response tokens
    label = {"lp": "log_probs", "old": "old_log_probs", "adv": "advantages"}[name]
    with pytest.raises(ValueError, match=f"{label} contains NaN or inf at response tokens"):
        policy_loss(tensors["lp"], tensors["old"], tensors["adv"], mask)


def test_rollout_log_probs_are_checked_too():
    lp, old, adv, mask = _ok()
    rollout = old.clone()
    rollout[0, 0] = float("nan")
    with pytest.raises(ValueError, match="rollout_log_probs contains NaN"):
        policy_loss(lp, old, adv, mask, rollout_log_probs=rollout)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"tau_pos": 0.0}, "tau_pos must be a finite number > 0"),
        ({"tau_neg": -1.05}, "tau_neg must be a finite number > 0"),
        ({"tau_pos": float("nan")}, "tau_pos must be a finite number > 0"),
        ({"clip_eps_low": -0.1}, "clip_eps_low must be a finite number >= 0"),
        ({"clip_eps_high": -1e-4, "loss_type": "gspo"}, "clip_eps_high must be a finite number >= 0"),
        ({"loss_type": "grpo", "clip_eps_low": 1.5}, "clip_eps_low must be <= 1"),
        ({"clip_ratio_c": 0.5}, "clip_ratio_c \\(dual clip\\) must be > 1"),
        ({"loss_type": "ppo"}, "unknown loss_type 'ppo'; expected one of: sapo, sapo_seq, gspo"),
        ({"loss_agg_mode": "mean"}, "unknown loss_agg_mode 'mean'"),
        ({"rollout_correction": "is"}, "unknown rollout_correction 'is'"),
        ({"rollout_correction_level": "seq"}, "unknown rollout_correction_level 'seq'"),
        ({"rollout_mis_low": 3.0, "rollout_mis_high": 2.0}, "rollout_mis_low \\(3.0\\) must be below"),
        ({"loss_norm_length": 0}, "loss_norm_length must be a positive integer"),
        ({"temperature": 1.0}, "unknown loss option\\(s\\) \\['temperature'\\]"),
    ],
)
def test_bad_options_are_named(options, message):
    lp, old, adv, mask = _ok()
    with pytest.raises(ValueError, match=message):
        policy_loss(lp, old, adv, mask, **options)


def test_config_object_and_keywords_agree():
    lp, old, adv, mask = _ok()
    cfg = LossConfig(loss_type="grpo", clip_eps_high=0.28)
    a, _ = policy_loss(lp, old, adv, mask, config=cfg)
    b, _ = policy_loss(lp, old, adv, mask, loss_type="grpo", clip_eps_high=0.28)
    c, _ = policy_loss(lp, old, adv, mask, config=LossConfig(loss_type="grpo"), clip_eps_high=0.28)
    assert a.item() == b.item() == c.item()
    assert cfg.clip_eps == (0.2, 0.28) and LossConfig(loss_type="gspo").clip_eps == (3e-4, 4e-4)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_metric_is_documented_and_finite(loss_type):
    lp, old, adv, mask = _ok()
    _, metrics = policy_loss(lp, old, adv, mask, loss_type=loss_type, rollout_log_probs=old - 0.1,
                             rollout_correction="mis")
    assert set(metrics) <= set(METRICS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["count/tokens"] == mask.sum().item() and metrics["count/seqs"] == 4.0
    expected_clip = {"sapo", "sapo_seq"}.isdisjoint({loss_type})
    assert ("clip/low_frac" in metrics) == expected_clip
    assert metrics.get("clip/frac", 0.0) == 0.0 or expected_clip


def test_ratio_kl_and_gate_metrics_against_hand_values():
    lp, old, adv, mask = ragged_batch(42, spread=1.0, pad=0.0)
    _, m = policy_loss(lp, old, adv, mask)
    r = torch.exp(lp.detach() - old)[mask]
    tau = torch.where(adv[:, None].expand(mask.shape) > 0, 1.0, 1.05).to(r.dtype)[mask]
    w = torch.tensor([1 / math.cosh(t * (x - 1) / 2) ** 2 for x, t in zip(r.tolist(), tau.tolist())])
    assert m["ratio/mean"] == pytest.approx(r.mean().item()) and m["ratio/max"] == pytest.approx(r.max().item())
    assert m["ratio/min"] == pytest.approx(r.min().item())
    assert m["kl/k3"] == pytest.approx((r - 1 - r.log()).mean().item())
    assert m["gate/weight_mean"] == pytest.approx(w.mean().item())
    assert m["gate/weight_min"] == pytest.approx(w.min().item())
    assert m["gate/weight_below_half_frac"] == pytest.approx((w < 0.5).double().mean().item())
    assert 0 < m["gate/weight_below_half_frac"] < 1
    assert m["entropy/sampled_nll"] == pytest.approx(-old[mask].double().mean().item())


def test_paper_gate_gap_example():
    # ../shared/ALGORITHM.md: r = (1.02, 1.01, 0.99, 2.5) gives D = 0.032 against a bound of 0.039 (tau = 1)
    r = torch.tensor([[1.02, 1.01, 0.99, 2.5]], dtype=torch.float64)
    old = torch.full_like(r, -2.0)
    _, m = policy_loss(old + r.log(), old, torch.tensor([1.0], dtype=torch.float64), torch.ones_like(r).bool())
    assert round(m["seq/gate_gap_mean"], 3) == 0.032 and round(m["seq/gate_gap_bound_mean"], 3) == 0.039
    assert m["seq/gate_gap_within_bound_frac"] == 1.0
    log_r = r.log()[0]
    assert m["seq/log_ratio_var_mean"] == pytest.approx(log_r.var(unbiased=False).item())


def test_gate_gap_bound_holds_on_random_off_policy_batches():
    for seed in range(5):
        lp, old, adv, mask = ragged_batch(50 + seed, spread=0.5, pad=0.0)
        _, m = policy_loss(lp, old, adv, mask, loss_type="sapo_seq")
        assert m["seq/gate_gap_within_bound_frac"] == 1.0
        assert 0 < m["seq/gate_gap_mean"] <= m["seq/gate_gap_bound_mean"]


def test_sapo_seq_gate_weight_is_that_of_the_sequence_ratio():
    lp, old, adv, mask = ragged_batch(43, spread=0.5, pad=0.0)
    _, m = policy_loss(lp, old, adv, mask, loss_type="sapo_seq")
    lr = torch.where(mask, lp.detach() - old, 0.0)
    s = torch.exp(lr.sum(-1) / mask.sum(-1).clamp(min=1))
    tau = torch.where(adv > 0, 1.0, 1.05).to(s.dtype)
    w = sapo_gate_weight(s, tau)[:, None].expand(mask.shape)[mask]
    assert m["gate/weight_min"] == pytest.approx(w.min().item())
    assert m["gate/weight_mean"] == pytest.approx(w.mean().item())


def test_micro_batch_metrics_reduce_to_the_whole_batch_metrics():
    """Split a batch in two row parts: reducing the parts' metrics by their declared reductions gives the whole
    batch's metrics (the smallest gate weight is the smaller of the two, not their mean; counts add up; token and
    sequence means are weighted by the parts' counts)."""
    lp, old, adv, mask = ragged_batch(44, spread=0.8, pad=0.0)
    rollout = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1), dtype=old.dtype)
    options = dict(loss_type="sapo", loss_agg_mode="seq-mean-token-mean", rollout_log_probs=rollout)
    _, whole = policy_loss(lp, old, adv, mask, **options)
    parts = [policy_loss(lp[rows], old[rows], adv[rows], mask[rows], rollout_log_probs=rollout[rows],
                         loss_type="sapo", loss_agg_mode="seq-mean-token-mean")[1] for rows in (slice(0, 1),
                                                                                                 slice(1, None))]
    assert parts[0]["gate/weight_min"] != parts[1]["gate/weight_min"]
    merged = reduce_metrics(parts)
    assert merged.keys() == whole.keys()
    for key in whole:
        assert merged[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), key
    assert whole["mismatch/abs_diff_max"] == pytest.approx((old - rollout).abs()[mask].max().item())
    assert whole["mismatch/abs_diff_mean"] == pytest.approx((old - rollout).abs()[mask].mean().item())


def test_every_metric_declares_its_reduction():
    assert all(m.reduce in REDUCTIONS for m in METRICS.values())
    assert {k for k, m in METRICS.items() if m.reduce == "min"} == {"ratio/min", "gate/weight_min"}
    with pytest.raises(KeyError, match="'train/bogus' declares no reduction"):
        reduce_metrics([{"train/bogus": 1.0}])
    with pytest.raises(ValueError, match="unknown reduction 'median'"):
        Metric("median", "")
