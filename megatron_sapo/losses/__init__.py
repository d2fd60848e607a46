"""Pure-math policy losses for RL post-training: SAPO, GSPO and the GRPO family, their aggregation modes,
group-relative advantages and rollout-mismatch corrections. Imports only torch."""

from .advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from .aggregation import aggregate, token_weights
from .config import LOSS_AGG_MODES, LOSS_TYPES, LossConfig
from .corrections import rollout_correction_weights
from .gates import sapo_gate, sapo_gate_weight, select_tau
from .metrics import METRICS
from .policy_loss import make_loss_config, policy_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "LOSS_AGG_MODES",
    "LOSS_TYPES",
    "METRICS",
    "LossConfig",
    "aggregate",
    "compute_advantages",
    "make_loss_config",
    "policy_loss",
    "rollout_correction_weights",
    "sapo_gate",
    "sapo_gate_weight",
    "select_tau",
    "token_weights",
]
