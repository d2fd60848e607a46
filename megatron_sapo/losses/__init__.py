"""Pure-math policy losses for RL post-training: SAPO, GSPO and the GRPO family, their aggregation modes,
group-relative advantages and rollout-mismatch corrections. Imports only torch."""

from .advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from .aggregation import aggregate, token_weights
from .config import LOSS_AGG_MODES, LOSS_TYPES, LossConfig
from .corrections import rollout_correction_weights
from .gates import sapo_gate, sapo_gate_weight, select_tau
from .metrics import METRICS, REDUCTIONS, Metric, metric_reduction, reduce_metrics
from .policy_loss import TOKEN_LOCAL_LOSS_TYPES, loss_weights, make_loss_config, policy_loss, token_losses

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "LOSS_AGG_MODES",
    "LOSS_TYPES",
    "METRICS",
    "Metric",
    "REDUCTIONS",
    "TOKEN_LOCAL_LOSS_TYPES",
    "LossConfig",
    "aggregate",
    "compute_advantages",
    "loss_weights",
    "make_loss_config",
    "metric_reduction",
    "policy_loss",
    "reduce_metrics",
    "rollout_correction_weights",
    "sapo_gate",
    "sapo_gate_weight",
    "select_tau",
    "token_losses",
    "token_weights",
]
