"""The rollout engine interface: what the trainer asks of SGLang servers and of the embedded engine alike.

Log-prob convention (both engines): the log-probability of each generated token under softmax(logits / temperature),
before any top-p / top-k truncation, i.e. the distribution the trainer's old/new log-probs are computed under.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings; the EOS token always stops
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")


@dataclass
class Completion:
    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]  # one per output token
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    weight_version: str
    extra: dict = field(default_factory=dict)
    # MoE routes while generating, when asked for (rollout.return_routes): [len(prompt_ids) + len(output_ids) - 1,
    # num_layers, top-k] expert ids (int16) of every token the engine fed through the model (all but the last one);
    # -1 for a layer without experts
    routes: torch.Tensor | None = None


class RolloutEngine(Protocol):
    """n samples for each prompt; the outer list follows the prompts, the inner one the samples."""

    def generate(self, prompts: list[str], n: int, params: SamplingParams,
                 return_routes: bool = False) -> list[list[Completion]]: ...

    def update_weights(self, model_dir: str, version: str) -> None: ...

    def shutdown(self) -> None: ...


def check_prompts(prompts, n: int) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p]
    if empty:
        raise ValueError(f"empty or non-string prompts at positions {empty[:5]}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
