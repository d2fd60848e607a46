"""Rollout engines behind one interface (engine.py): the embedded transformers engine (CPU default) and SGLang
servers (sglang.py, imported on demand: megatron_sapo.rollout.sglang), whose weights are synced from an exported
folder or broadcast over a process group (weight_sync.py, also on demand)."""

from .embedded import EmbeddedEngine
from .engine import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "EmbeddedEngine", "RolloutEngine", "SamplingParams"]
