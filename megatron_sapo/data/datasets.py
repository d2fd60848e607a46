"""Prompt datasets from JSONL and Parquet files: one record per row with a prompt (a string or chat messages) and a
reference answer. Malformed rows (not an object, missing or empty prompt, missing answer, messages of the wrong
shape) are skipped and counted, or rejected with the file and line (row) number, as DataConfig.on_malformed says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataConfig


class MalformedRowError(ValueError):
    pass


@dataclass(frozen=True)
class PromptRecord:
    prompt: str | tuple[dict, ...]  # text, or chat messages
    answer: str
    source: str  # "file:line" (1-based line for JSONL, 1-based row for Parquet)
    extra: dict = field(default_factory=dict, compare=False)  # the row's other fields, for reward functions


@dataclass
class LoadReport:
    rows: int = 0
    kept: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)  # the first few problems, with their source


def _rows(path: Path):
    """(1-based position, raw row or None when the line is not JSON) for every row of the file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row, None
        return
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"unsupported prompt file type {path.suffix!r} ({path}); use .jsonl, .json or .parquet")
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line), None
            except json.JSONDecodeError as err:
                yield i, None, f"not valid JSON ({err.msg})"


def _record(row, cfg: DataConfig, source: str) -> PromptRecord:
    if not isinstance(row, dict):
        raise MalformedRowError(f"{source}: a row must be an object, got {type(row).__name__}")
    prompt = row.get(cfg.prompt_key)
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                 and isinstance(m.get("content"), str) for m in prompt):
            raise MalformedRowError(f"{source}: '{cfg.prompt_key}' messages must be objects with string role and "
                                    "content")
        prompt = tuple({"role": m["role"], "content": m["content"]} for m in prompt)
    elif not isinstance(prompt, str) or not prompt.strip():
        raise MalformedRowError(f"{source}: missing or empty '{cfg.prompt_key}'")
    answer = row.get(cfg.answer_key)
    if answer is None or isinstance(answer, (dict, list)):
        raise MalformedRowError(f"{source}: missing '{cfg.answer_key}' (or not a scalar)")
    extra = {k: v for k, v in row.items() if k not in (cfg.prompt_key, cfg.answer_key)}
    return PromptRecord(prompt, str(answer), source, extra)


def load_prompts(paths: list[str | Path], cfg: DataConfig) -> tuple[list[PromptRecord], LoadReport]:
    """All records of the files, in file order; the report counts rows, kept and malformed ones."""
    records: list[PromptRecord] = []
    report = LoadReport()
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        for position, row, problem in _rows(path):
            report.rows += 1
            source = f"{path}:{position}"
            try:
                if problem:
                    raise MalformedRowError(f"{source}: {problem}")
                records.append(_record(row, cfg, source))
                report.kept += 1
            except MalformedRowError as err:
                if cfg.on_malformed == "error":
                    raise
                report.malformed += 1
                if len(report.examples) < 5:
                    report.examples.append(str(err))
    if not records:
        raise ValueError(f"no usable prompts in {', '.join(map(str, paths)) or '(no files given)'} "
                         f"({report.malformed} malformed rows)")
    return records, report
