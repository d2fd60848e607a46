"""The stability indicators against curves whose answer is known by construction."""

import pytest

from megatron_sapo.analysis.stability import StabilityConfig, collapse_step, smooth, spikes, stability

CFG = StabilityConfig(window=5, drop=0.3, min_best=0.05)


def curve(values, start=1):
    return [(start + i, float(v)) for i, v in enumerate(values)]


def test_smooth_is_a_trailing_mean():
    assert smooth(curve([1, 2, 3, 4]), 2) == [(1, 1.0), (2, 1.5), (3, 2.5), (4, 3.5)]


def test_a_rise_then_a_lasting_fall_is_a_collapse_at_the_first_step_below():
    reward = curve([0.2] * 5 + [0.8] * 20 + [0.1] * 20)  # the fall starts at step 26
    # trailing means of 5: step 26 (4 x 0.8 + 0.1) / 5 = 0.66, step 27 (3 x 0.8 + 2 x 0.1) / 5 = 0.52 < 0.7 x 0.8
    assert collapse_step(reward, CFG) == 27
    assert stability({"reward/mean": reward}, CFG)["collapsed"] == 1.0


def test_recovery_dips_short_ends_and_low_bests_are_no_collapse():
    recovered = curve([0.8] * 10 + [0.1] * 10 + [0.8] * 10)
    assert collapse_step(recovered, CFG) is None
    late_dip = curve([0.8] * 20 + [0.0] * 5)  # below for fewer than `window` smoothed steps at the end
    assert collapse_step(late_dip, CFG) is None
    noise = curve([0.04, 0.0, 0.03, 0.0] * 5)  # never reaches min_best
    assert collapse_step(noise, CFG) is None


def test_grad_norm_spikes_against_the_median_before():
    grad = curve([1.0, 1.1, 0.9, 1.0, 8.0, 1.0, 1.0, 4.0])
    assert spikes(grad, 5.0, 5) == [5]
    assert spikes(grad, 3.0, 5) == [5, 8]


def test_stability_reports_every_indicator_and_none_for_what_was_not_logged():
    history = {"reward/mean": curve([0.5] * 12), "ratio/max": curve([2, 30, 3]),
               "mismatch/abs_diff_max": curve([0.1, 2.0, 1.5]), "entropy/sampled_nll": curve([2.0] * 5 + [0.5] * 5)}
    out = stability(history, CFG)
    assert out["collapsed"] == 0.0 and out["collapse_step"] is None
    assert out["ratio_blowups"] == 1 and out["ratio_max"] == 30
    assert out["mismatch_blowups"] == 2
    assert out["entropy_first"] == pytest.approx(2.0) and out["entropy_last"] == pytest.approx(0.5)
    assert out["grad_norm_spikes"] is None  # no train/grad_norm in the history
    assert stability({}, CFG)["collapsed"] is None


@pytest.mark.parametrize("bad", [{"window": 0}, {"drop": 1.0}, {"drop": 0.0}, {"spike_factor": 0.0}])
def test_bad_thresholds_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        StabilityConfig(**bad)
