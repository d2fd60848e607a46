"""Gate dumps and the paper's Figs. 2-3 statistics against a plain-Python reference and the paper's own example."""

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_sapo.analysis.gate_diagnostics import (DUMP_DIR, GateDump, dumped_steps, gate_statistics, load_step,
                                                     plot_gate_diagnostics, summarize)

LOSS = SimpleNamespace(loss_type="sapo", tau_pos=1.0, tau_neg=1.05)


def sech2(x):
    return 1 / math.cosh(x) ** 2


def reference(log_ratios, tau):
    """Var_i, D_i and the bound of one sequence, written out from ../shared/ALGORITHM.md."""
    n = len(log_ratios)
    mean = sum(log_ratios) / n
    var = sum((x - mean) ** 2 for x in log_ratios) / n
    gap = abs(sum(sech2(tau * x / 2) for x in log_ratios) / n - sech2(tau * mean / 2))
    return var, gap, tau * tau * var / 4


def test_the_papers_example_sequence():
    """ALGORITHM.md: r = (1.02, 1.01, 0.99, 2.5) gives D = 0.032 against a bound of 0.039."""
    dump = GateDump(5, LOSS)
    log_r = torch.tensor([[1.02, 1.01, 0.99, 2.5]]).log()
    dump.add(log_r, torch.ones(1, 4), torch.tensor([1.0]))
    stats = gate_statistics({"tau_pos": 1.0, "tau_neg": 1.05, "updates": dump.updates}, slice(None))
    assert stats["gap"].item() == pytest.approx(0.032, abs=5e-4)
    assert stats["bound"].item() == pytest.approx(0.039, abs=5e-4)


def test_statistics_match_the_reference_per_sequence_and_skip_the_first_update(tmp_path):
    gen = torch.Generator().manual_seed(0)
    dump = GateDump(7, LOSS)
    lengths = [3, 1, 5, 0, 4]  # a row without response tokens (padding of a mini-batch) is left out
    mask = torch.tensor([[i < n for i in range(6)] for n in lengths], dtype=torch.float32)
    adv = torch.tensor([1.0, -0.5, -2.0, 0.0, 0.7])
    dump.add(torch.zeros(5, 6), mask, adv)  # update 1: r = 1 everywhere
    log_r = torch.randn(5, 6, generator=gen) * 0.5
    dump.add(log_r, mask, adv[:, None].expand(5, 6))  # per-token advantages: the row's mean picks tau
    path = dump.save(tmp_path, dp_rank=0)
    assert path.parent.name == DUMP_DIR and dumped_steps(tmp_path) == [7]

    stats = gate_statistics(load_step(tmp_path, 7))  # default: updates 2 onwards
    rows = [i for i, n in enumerate(lengths) if n]
    assert len(stats["var"]) == len(rows)
    for k, i in enumerate(rows):
        var, gap, bound = reference(log_r[i, :lengths[i]].double().tolist(), 1.0 if adv[i] > 0 else 1.05)
        assert stats["var"][k].item() == pytest.approx(var, abs=1e-12)
        assert stats["gap"][k].item() == pytest.approx(gap, abs=1e-12)
        assert stats["bound"][k].item() == pytest.approx(bound, abs=1e-12)
    expected_r = torch.cat([log_r[i, :lengths[i]] for i in rows]).double().exp()
    torch.testing.assert_close(stats["ratio"], expected_r, rtol=1e-6, atol=0)
    info = summarize(stats)
    assert info["sequences"] == 4 and info["tokens"] == sum(lengths)
    assert info["within_bound_frac"] == 1.0  # the paper's bound holds for every sequence
    token_adv = torch.cat([adv[i].repeat(lengths[i]) for i in rows])
    assert info["neg_adv_ratio_below_0.8_frac"] == pytest.approx(
        ((token_adv < 0) & (expected_r < 0.8)).double().mean().item())
    assert info["pos_adv_ratio_above_1.2_frac"] == pytest.approx(
        ((token_adv > 0) & (expected_r > 1.2)).double().mean().item())
    assert 0 < info["neg_adv_ratio_below_0.8_frac"] < 1


def test_data_parallel_ranks_merge_and_non_finite_sequences_are_left_out(tmp_path):
    for rank, value in ((0, 0.1), (1, float("nan"))):
        dump = GateDump(3, LOSS)
        dump.add(torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2))
        dump.add(torch.full((2, 2), value), torch.ones(2, 2), torch.ones(2))
        dump.save(tmp_path, dp_rank=rank)
    merged = load_step(tmp_path, 3)
    assert [len(u["lengths"]) for u in merged["updates"]] == [4, 4]
    stats = gate_statistics(merged)
    assert len(stats["var"]) == 2 and torch.isfinite(stats["ratio"]).all()  # rank 1's NaN rows are dropped


def test_the_figure_and_summary_and_a_clear_error_without_dumps(tmp_path):
    with pytest.raises(ValueError, match="trainer.gate_dump_steps"):
        plot_gate_diagnostics(tmp_path)
    gen = torch.Generator().manual_seed(1)
    for step in (2, 9, 30):
        dump = GateDump(step, LOSS)
        for _ in range(3):
            dump.add(torch.randn(8, 5, generator=gen) * 0.1 * step, torch.ones(8, 5), torch.randn(8, generator=gen))
        dump.save(tmp_path, dp_rank=0)
    pytest.importorskip("matplotlib")
    figure, summary = plot_gate_diagnostics(tmp_path, tmp_path / "out")
    assert figure.read_bytes().startswith(b"\x89PNG")
    import json

    info = json.loads(summary.read_text())
    assert sorted(info) == ["2", "30"]  # the earliest and the latest
    assert info["30"]["var_median"] > info["2"]["var_median"]
    with pytest.raises(ValueError, match="no gate dump of step 4"):
        load_step(tmp_path, 4)
