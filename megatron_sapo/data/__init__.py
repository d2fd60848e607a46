"""Prompt data: datasets (JSONL, Parquet), deterministic resumable sampling, chat templates, dynamic sampling and
the synthetic task of the CPU demo."""

from .chat import render_prompt
from .config import DataConfig
from .datasets import LoadReport, MalformedRowError, PromptRecord, load_prompts
from .dynamic_sampling import fill_groups, informative_groups
from .sampler import PromptSampler
from .synthetic import sort_digits_examples, write_jsonl

__all__ = ["DataConfig", "LoadReport", "MalformedRowError", "PromptRecord", "PromptSampler", "fill_groups",
           "informative_groups", "load_prompts", "render_prompt", "sort_digits_examples", "write_jsonl"]
