import math

import pytest
import torch

from megatron_sapo.losses import LOSS_AGG_MODES, aggregate, policy_loss, rollout_correction_weights

from . import reference
from .batches import ragged_batch


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_each_mode_on_ragged_mask_matches_loop(mode):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(6, 11, generator=g) > 0.4
    mask[2] = False  # an empty row
    mask[4] = True  # a full row
    values = torch.randn(6, 11, generator=g, dtype=torch.float64)
    values[~mask] = float("inf")
    rows = [[values[i, t] if mask[i, t] else None for t in range(11)] for i in range(6)]
    assert aggregate(values, mask, mode).item() == pytest.approx(reference.aggregate(rows, mode).item(), rel=1e-12)


def _correction_reference(old, rollout, mask, mode, level, cap=2.0, low=0.5, high=5.0):
    out = torch.zeros_like(old)
    for i in range(old.shape[0]):
        toks = [t for t in range(old.shape[1]) if mask[i, t]]
        logs = {t: float(old[i, t] - rollout[i, t]) for t in toks}
        if level == "sequence":
            logs = {t: sum(logs.values()) for t in toks}
        elif level == "geometric":
            logs = {t: sum(logs.values()) / len(toks) for t in toks}
        for t in toks:
            w = math.exp(logs[t])
            out[i, t] = min(w, cap) if mode == "tis" else (w if low <= w <= high else 0.0)
    return out


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_correction_weights_match_loop(mode, level):
    lp, old, adv, mask = ragged_batch(31, pad=0.0)
    # rows 0 and 1 far enough off that even their geometric-mean weight (about e^1.8 and e^-0.9) gets changed
    offset = torch.tensor([-1.8, 0.9, 0.0, 0.2, -0.1], dtype=old.dtype)[:, None]
    rollout = old + offset + 0.6 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2), dtype=old.dtype)
    weights, changed = rollout_correction_weights(old, rollout, mask, mode=mode, level=level, tis_cap=2.0,
                                                  mis_low=0.5, mis_high=5.0)
    expected = _correction_reference(old, rollout, mask, mode, level)
    torch.testing.assert_close(torch.where(mask, weights, 0.0), expected, rtol=1e-12, atol=1e-12)
    assert changed.any() and not changed[~mask].any()


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_corrected_loss_is_weighted_token_loss_with_detached_weights(mode):
    lp, old, adv, mask = ragged_batch(32, pad=0.0)
    rollout = (old + 0.8 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3), dtype=old.dtype))
    rollout = rollout.requires_grad_()
    loss, m = policy_loss(lp, old, adv, mask, rollout_log_probs=rollout, rollout_correction=mode,
                          loss_agg_mode="token-mean")
    weights = _correction_reference(old, rollout.detach(), mask, mode, "token")
    rows = reference.token_loss_matrix("sapo", lp, old, adv[:, None].expand(mask.shape), mask)
    rows = [[None if x is None else x * weights[i, t] for t, x in enumerate(row)] for i, row in enumerate(rows)]
    assert loss.item() == pytest.approx(reference.aggregate(rows, "token-mean").item(), rel=1e-12)
    grad_lp, grad_rollout = torch.autograd.grad(loss, (lp, rollout), allow_unused=True)
    assert grad_rollout is None and grad_lp is not None
    assert 0 < m["mismatch/changed_frac"] < 1 and m["mismatch/k3"] > 0


def test_correction_needs_rollout_log_probs():
    lp, old, adv, mask = ragged_batch(33)
    with pytest.raises(ValueError, match="rollout_correction='tis' needs rollout_log_probs"):
        policy_loss(lp, old, adv, mask, rollout_correction="tis")


def test_sequence_product_of_many_weights_does_not_overflow():
    old = torch.zeros(1, 4000)
    rollout = torch.full((1, 4000), -0.5)  # product e^2000 overflows fp32 without the log-space clamp
    mask = torch.ones(1, 4000, dtype=torch.bool)
    w, changed = rollout_correction_weights(old, rollout, mask, mode="tis", level="sequence", tis_cap=2.0,
                                            mis_low=0.5, mis_high=5.0)
    assert torch.all(w == 2.0) and changed.all()
