"""The exact-match reward and its normalisation options."""

from megatron_sapo.rewards.exact_match import exact_match


def test_exact_match_compares_the_anchored_answer_or_the_whole_completion():
    assert exact_match("Paris", "Paris") == 1.0
    assert exact_match("  Paris \n", "Paris") == 1.0
    assert exact_match("The capital is large. The answer is Paris.", "Paris") == 1.0
    assert exact_match("\\boxed{1 2 3}", "1 2 3") == 1.0
    assert exact_match("abc 12", "12") == 0.0  # no last-number fallback
    assert exact_match("Paris", "Lyon") == 0.0


def test_exact_match_options():
    assert exact_match("new   york", "new york") == 1.0
    assert exact_match("new   york", "new york", collapse_whitespace=False) == 0.0
    assert exact_match("PARIS", "paris") == 0.0
    assert exact_match("PARIS", "paris", ignore_case=True) == 1.0
    assert exact_match("Paris", "Paris", task="capitals") == 1.0  # per-sample extras are ignored
