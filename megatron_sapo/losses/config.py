"""The loss component's configuration: one dataclass, validated on construction.

Every option of `policy_loss` lives here so that the trainer's YAML (`loss.*` keys) and a direct call share one
definition and one set of checks. Defaults follow ../shared/ALGORITHM.md: the paper's SAPO (tau_pos 1.0,
tau_neg 1.05, seq-mean-token-mean), GSPO's eps 3e-4 / 4e-4, GRPO's 0.2 / 0.2 with dual clip c = 3.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

LOSS_TYPES = ("sapo", "sapo_seq", "gspo", "gspo_token", "grpo", "cispo")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ROLLOUT_CORRECTIONS = ("tis", "mis")
ROLLOUT_CORRECTION_LEVELS = ("token", "sequence", "geometric")

# (eps_low, eps_high) per clipped loss. CISPO: MiniMax-M1 sets no lower bound (eps_low = 1 clips at 0) and tunes
# only eps_high; 0.28 is the DAPO clip-higher value that peers use as its default.
DEFAULT_CLIP_EPS = {
    "gspo": (3e-4, 4e-4),
    "gspo_token": (3e-4, 4e-4),
    "grpo": (0.2, 0.2),
    "cispo": (1.0, 0.28),
}


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(map(str, choices))}")


def check_positive(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_non_negative(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class LossConfig:
    """Options of the policy loss (see `policy_loss` for the meaning of each)."""

    loss_type: str = "sapo"
    loss_agg_mode: str = "seq-mean-token-mean"
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    clip_ratio_c: float | None = 3.0
    rollout_correction: str | None = None
    rollout_correction_level: str = "token"
    rollout_tis_cap: float = 2.0
    rollout_mis_low: float = 0.5
    rollout_mis_high: float = 5.0
    loss_norm_length: int | None = None
    log_ratio_clamp: float = 20.0

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        check_positive("tau_pos", self.tau_pos)
        check_positive("tau_neg", self.tau_neg)
        for name in ("clip_eps_low", "clip_eps_high"):
            if getattr(self, name) is not None:
                check_non_negative(name, getattr(self, name))
        low, _ = self.clip_eps
        if self.loss_type in DEFAULT_CLIP_EPS and low > 1:
            raise ValueError(f"clip_eps_low must be <= 1 (the ratio's lower bound is 1 - clip_eps_low), got {low}")
        if self.clip_ratio_c is not None:
            check_positive("clip_ratio_c", self.clip_ratio_c)
            if self.clip_ratio_c <= 1:
                raise ValueError(f"clip_ratio_c (dual clip) must be > 1 or None to disable, got {self.clip_ratio_c}")
        if self.rollout_correction is not None:
            check_choice("rollout_correction", self.rollout_correction, ROLLOUT_CORRECTIONS)
        check_choice("rollout_correction_level", self.rollout_correction_level, ROLLOUT_CORRECTION_LEVELS)
        check_positive("rollout_tis_cap", self.rollout_tis_cap)
        check_non_negative("rollout_mis_low", self.rollout_mis_low)
        check_positive("rollout_mis_high", self.rollout_mis_high)
        if self.rollout_mis_low >= self.rollout_mis_high:
            raise ValueError(
                f"rollout_mis_low ({self.rollout_mis_low}) must be below rollout_mis_high ({self.rollout_mis_high})"
            )
        if self.loss_norm_length is not None and (
            not isinstance(self.loss_norm_length, int) or isinstance(self.loss_norm_length, bool)
            or self.loss_norm_length <= 0
        ):
            raise ValueError(f"loss_norm_length must be a positive integer or None, got {self.loss_norm_length!r}")
        check_positive("log_ratio_clamp", self.log_ratio_clamp)

    @property
    def clip_eps(self) -> tuple[float, float]:
        """(eps_low, eps_high) with the loss type's defaults filled in; (0, 0) for the unclipped SAPO losses."""
        default_low, default_high = DEFAULT_CLIP_EPS.get(self.loss_type, (0.0, 0.0))
        low = default_low if self.clip_eps_low is None else self.clip_eps_low
        high = default_high if self.clip_eps_high is None else self.clip_eps_high
        return low, high

    def to_dict(self) -> dict:
        return asdict(self)
