"""The rewards component's configuration (`rewards.*` keys): which reward function, and how the pool runs it.

The checks are written here rather than borrowed from `losses.config`: every reward worker process imports this
package, and `megatron_sapo.losses` imports torch (~2 s per worker start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .registry import check_reward_name


@dataclass(frozen=True)
class RewardConfig:
    function: str = "math"  # a built-in ("math", "exact_match") or "package.module:function"
    function_kwargs: dict = field(default_factory=dict)  # fixed keyword arguments of every call
    num_workers: int = 2  # worker processes
    timeout_s: float = 10.0  # wall-clock limit of one call; the worker is killed and replaced past it
    failure_reward: float = 0.0  # the reward of a sample whose call raised, timed out, crashed or returned garbage

    def __post_init__(self) -> None:
        try:
            check_reward_name(self.function)
        except ValueError as exc:
            raise ValueError(f"rewards.function: {exc}") from None
        if not isinstance(self.function_kwargs, dict) or not all(isinstance(k, str) for k in self.function_kwargs):
            raise ValueError(f"rewards.function_kwargs must be a dict with string keys, got {self.function_kwargs!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"rewards.num_workers must be an integer >= 1, got {self.num_workers!r}")
        for name in ("timeout_s", "failure_reward"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"rewards.{name} must be a finite number, got {value!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"rewards.timeout_s must be > 0, got {self.timeout_s!r}")
