"""Rewards: verifiable math (final-answer extraction, numeric and symbolic equivalence), exact match, and user
reward functions named "package.module:function", run by a pool of worker processes with a per-call timeout.

Every pool worker imports this package, so it imports neither torch nor sympy: the math reward, which needs sympy
through math-verify, is imported from its module (`megatron_sapo.rewards.math_reward`) or resolved by name ("math").
"""

from .config import RewardConfig
from .exact_match import exact_match
from .extract import extract_answer, extract_reference
from .numeric import numbers_equal, parse_number
from .pool import RewardPool, RewardStats
from .registry import BUILTIN_REWARDS, resolve_reward

__all__ = [
    "BUILTIN_REWARDS",
    "RewardConfig",
    "RewardPool",
    "RewardStats",
    "exact_match",
    "extract_answer",
    "extract_reference",
    "numbers_equal",
    "parse_number",
    "resolve_reward",
]
