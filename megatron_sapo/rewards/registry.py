"""Reward functions by name: the built-ins, or a user's "package.module:function" imported at run time.

A reward is named rather than passed as an object so that a YAML config can choose it and every worker process of
the pool can import it for itself. Every reward function has the signature
`fn(completion: str, answer: str, **extra) -> float`, where `extra` holds the sample's per-sample fields.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

BUILTIN_REWARDS = {
    "math": "megatron_sapo.rewards.math_reward:math_reward",
    "exact_match": "megatron_sapo.rewards.exact_match:exact_match",
}

RewardFunction = Callable[..., float]


def _split_name(name) -> tuple[str, str]:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward function name must be a non-empty string, got {name!r}")
    target = BUILTIN_REWARDS.get(name, name)
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute or ":" in attribute:
        raise ValueError(
            f"unknown reward function {name!r}; expected one of {', '.join(BUILTIN_REWARDS)} "
            f"or 'package.module:function'"
        )
    return module_name, attribute


def check_reward_name(name) -> None:
    """Raise ValueError unless `name` is a built-in name or has the "module:function" form (imports nothing)."""
    _split_name(name)


def resolve_reward(name: str) -> RewardFunction:
    """The reward function `name` denotes, imported now; ValueError for a name, module or attribute that is not
    there or not callable. Any other error raised while importing the user's module propagates unchanged."""
    module_name, attribute = _split_name(name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {name!r}: cannot import module {module_name!r} ({exc})") from exc
    try:
        function = getattr(module, attribute)
    except AttributeError as exc:
        raise ValueError(f"reward function {name!r}: module {module_name!r} has no attribute {attribute!r}") from exc
    if not callable(function):
        raise ValueError(f"reward function {name!r}: {attribute!r} is a {type(function).__name__}, not callable")
    return function
