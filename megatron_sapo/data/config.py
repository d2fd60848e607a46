"""The data component's configuration (`data.*` keys): where prompts come from and how a step's groups are drawn."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses.config import check_choice

MALFORMED_POLICIES = ("skip", "error")


@dataclass(frozen=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # .jsonl / .json (one object per line) / .parquet
    eval_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"  # a string, or a list of chat messages {"role", "content"}
    answer_key: str = "answer"
    on_malformed: str = "skip"  # "skip": drop and count the row; "error": stop with the file and line number
    shuffle: bool = True
    seed: int = 0
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    apply_chat_template: bool = True  # when the tokenizer has one
    system_prompt: str | None = None
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and top up from the next prompts
    max_fill_rounds: int = 4  # generation rounds a step may use to fill its groups under dynamic sampling

    def __post_init__(self) -> None:
        check_choice("data.on_malformed", self.on_malformed, MALFORMED_POLICIES)
        for name in ("prompts_per_step", "samples_per_prompt", "max_fill_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be an integer >= 1, got {value!r}")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ValueError("data.dynamic_sampling needs data.samples_per_prompt >= 2 (a group of one is constant)")
        if not self.prompt_key or not self.answer_key:
            raise ValueError("data.prompt_key and data.answer_key must be non-empty")
