"""Stability indicators of one training run, from its metric curves (pure Python: no torch, no MLflow).

- collapse: the reward, smoothed over `window` logged steps (a trailing mean), falls by more than `drop` (a fraction)
  below its running best and stays there to the end of the run, for at least `window` logged steps (a dip at the
  very end is not yet a collapse). The step of collapse is the first step of that final stretch. A best below
  `min_best` is too low to fall from (noise at the start of a run is not a collapse).
- grad-norm spikes: steps whose grad norm exceeds `spike_factor` times the median of the `window` steps before.
- ratio blow-ups: steps whose largest token ratio (ratio/max) exceeds `ratio_limit`.
- mismatch blow-ups: steps whose largest |trainer - engine| log-prob (mismatch/abs_diff_max) exceeds
  `mismatch_limit` nats (a weight sync that went wrong, or a precision problem).
- entropy: the estimate entropy/sampled_nll at the start and the end; a collapse of exploration shows as its fall.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

Curve = list[tuple[int, float]]  # (step, value), steps increasing


@dataclass(frozen=True)
class StabilityConfig:
    window: int = 10
    drop: float = 0.3
    min_best: float = 0.05
    spike_factor: float = 5.0
    ratio_limit: float = 10.0
    mismatch_limit: float = 1.0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1 logged steps, got {self.window}")
        if not 0 < self.drop < 1:
            raise ValueError(f"drop must be a fraction in (0, 1), got {self.drop}")
        for name in ("spike_factor", "ratio_limit", "mismatch_limit"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def smooth(curve: Curve, window: int) -> Curve:
    """Trailing mean over the last `window` points (fewer at the start)."""
    values = [v for _, v in curve]
    out, total = [], 0.0
    for i, (step, value) in enumerate(curve):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append((step, total / min(i + 1, window)))
    return out


def collapse_step(reward: Curve, cfg: StabilityConfig = StabilityConfig()) -> int | None:
    """The step at which the smoothed reward collapsed for good (see the module docstring), or None."""
    smoothed = smooth(reward, cfg.window)
    best = -math.inf
    start, length = None, 0  # the current stretch below the threshold: its first step, its length
    for step, value in smoothed:
        best = max(best, value)
        below = best >= cfg.min_best and value < (1 - cfg.drop) * best
        if below and start is None:
            start = step
        if not below:
            start, length = None, 0
        else:
            length += 1
    return start if length >= cfg.window else None


def spikes(curve: Curve, factor: float, window: int) -> list[int]:
    """Steps whose value exceeds `factor` x the median of the `window` values before it."""
    out = []
    for i in range(1, len(curve)):
        before = [v for _, v in curve[max(0, i - window):i]]
        if curve[i][1] > factor * statistics.median(before):
            out.append(curve[i][0])
    return out


def stability(history: dict[str, Curve], cfg: StabilityConfig = StabilityConfig()) -> dict[str, float | None]:
    """The indicators of one run's history (metric -> curve); a metric the run did not log gives None."""
    reward = history.get("reward/mean", [])
    grad = history.get("train/grad_norm", [])
    ratio = history.get("ratio/max", [])
    mismatch = history.get("mismatch/abs_diff_max", [])
    entropy = history.get("entropy/sampled_nll", [])
    collapsed = collapse_step(reward, cfg) if reward else None
    k = min(cfg.window, len(entropy))
    return {
        "collapsed": None if not reward else float(collapsed is not None),
        "collapse_step": collapsed,
        "best_reward_smoothed": max((v for _, v in smooth(reward, cfg.window)), default=None),
        "grad_norm_spikes": float(len(spikes(grad, cfg.spike_factor, cfg.window))) if grad else None,
        "ratio_blowups": float(sum(v > cfg.ratio_limit for _, v in ratio)) if ratio else None,
        "ratio_max": max((v for _, v in ratio), default=None),
        "mismatch_blowups": float(sum(v > cfg.mismatch_limit for _, v in mismatch)) if mismatch else None,
        "entropy_first": sum(v for _, v in entropy[:k]) / k if k else None,
        "entropy_last": sum(v for _, v in entropy[-k:]) / k if k else None,
    }
