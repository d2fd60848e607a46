"""Resolving reward names, and RewardConfig's checks."""

import pytest

from megatron_sapo.rewards import RewardConfig, exact_match, resolve_reward
from megatron_sapo.rewards.math_reward import math_reward
from tests.rewards import helpers


def test_builtin_and_user_names_resolve():
    assert resolve_reward("math") is math_reward
    assert resolve_reward("exact_match") is exact_match
    assert resolve_reward("tests.rewards.helpers:scripted") is helpers.scripted


@pytest.mark.parametrize(
    "name, message",
    [
        ("maths", "unknown reward function 'maths'"),
        ("", "non-empty string"),
        (None, "non-empty string"),
        (":scripted", "unknown reward function"),
        ("tests.rewards.helpers:", "unknown reward function"),
        ("a:b:c", "unknown reward function"),
        ("no_such_package.rewards:score", "cannot import module 'no_such_package.rewards'"),
        ("tests.rewards.helpers:missing", "has no attribute 'missing'"),
        ("tests.rewards.helpers:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not callable"),
    ],
)
def test_bad_names_are_value_errors(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward(name)


def test_config_defaults_and_checks():
    config = RewardConfig()
    assert (config.function, config.num_workers, config.timeout_s, config.failure_reward) == ("math", 2, 10.0, 0.0)
    RewardConfig(function="no_such_package.rewards:score")  # the config checks the form; the pool imports
    bad = [
        (dict(function="maths"), "rewards.function"),
        (dict(function_kwargs=[1]), "rewards.function_kwargs"),
        (dict(function_kwargs={1: 2}), "rewards.function_kwargs"),
        (dict(num_workers=0), "rewards.num_workers"),
        (dict(num_workers=2.0), "rewards.num_workers"),
        (dict(timeout_s=0), "rewards.timeout_s"),
        (dict(timeout_s=float("inf")), "rewards.timeout_s"),
        (dict(failure_reward=float("nan")), "rewards.failure_reward"),
        (dict(failure_reward=True), "rewards.failure_reward"),
    ]
    for kwargs, key in bad:
        with pytest.raises(ValueError, match=key):
            RewardConfig(**kwargs)
