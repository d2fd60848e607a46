"""Rollout engines behind one interface (engine.py): the embedded transformers engine (CPU default); the SGLang
engine arrives with the rest of the rollout issue."""

from .embedded import EmbeddedEngine
from .engine import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "EmbeddedEngine", "RolloutEngine", "SamplingParams"]
