"""The training job's configuration: one dataclass per component, composed into `TrainConfig`, loaded from YAML and
overridden by dotted keys (`trainer.steps=10 loss.loss_type=gspo`).

Each component owns its dataclass and its checks (policy/config.py, rollout/config.py, ...); this module only
assembles them. Loading is strict: an unknown key, a value of the wrong type or one a component refuses is a
ValueError that names the dotted key, before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.config import DataConfig
from .losses.advantages import ADVANTAGE_ESTIMATORS
from .losses.config import LossConfig, check_choice
from .policy.config import PolicyConfig
from .rewards.config import RewardConfig
from .rollout.config import RolloutConfig
from .tracking import TrackingConfig


@dataclass(frozen=True)
class TrainerConfig:
    steps: int = 100  # RL steps: one rollout batch each
    mini_batches: int = 4  # optimizer updates per rollout batch (the SAPO paper uses 4)
    advantage_estimator: str = "grpo"  # grpo | dr_grpo | rloo, over each prompt's samples
    eval_every: int = 10  # steps between evaluations (also before the first step and after the last); 0: never
    eval_prompts: int = 64  # held-out prompts per evaluation (the first ones of data.eval_files)
    eval_samples_per_prompt: int = 1
    eval_temperature: float | None = None  # None: rollout.temperature
    eval_pass_threshold: float = 1.0  # a sample counts as solved for pass@1 when its reward is at least this
    log_samples: int = 8  # completions saved as an artifact at each evaluation
    checkpoint_every: int = 50  # steps between checkpoints (and one after the last step); 0: only the last
    keep_checkpoints: int = 2
    resume: bool = True  # continue from output_dir's latest checkpoint when there is one

    def __post_init__(self) -> None:
        check_choice("trainer.advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        for name, low in (("steps", 1), ("mini_batches", 1), ("eval_every", 0), ("eval_prompts", 1),
                          ("eval_samples_per_prompt", 1), ("log_samples", 0), ("checkpoint_every", 0),
                          ("keep_checkpoints", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"trainer.{name} must be an integer >= {low}, got {value!r}")
        if self.eval_temperature is not None and not (math.isfinite(self.eval_temperature)
                                                      and self.eval_temperature > 0):
            raise ValueError(f"trainer.eval_temperature must be > 0 or null, got {self.eval_temperature!r}")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "outputs/run"  # checkpoints, exported weights, logs, the resolved config, the MLflow store
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir must be a non-empty path")


# ---- loading ----------------------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """`value` as the annotated type `tp`, or a ValueError naming `key`. YAML's own typing is kept, except that
    numbers written as strings (PyYAML reads `3e-4` as a string) become numbers where a number is expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else int(value)
            except ValueError:
                raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not float(value)
                                                                              .is_integer()):
            raise ValueError(f"{key}: expected {tp.__name__}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown key {prefix}{unknown[0]}; {prefix.rstrip('.') or 'the top level'} has: "
                         f"{', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        message, section = str(err), prefix.rstrip(".")
        if not section or message.startswith(section):
            raise
        words = message.split(" ", 2)  # "x must be ..." or "unknown x 'v'; ...": name the dotted key x
        for i, word in enumerate(words[:2]):
            if word in names:
                words[i] = prefix + word
                raise ValueError(" ".join(words)) from None
        raise ValueError(f"{section}: {message}") from None


def parse_override(text: str) -> tuple[list[str], object]:
    """'a.b=value' -> (['a', 'b'], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ValueError(f"override {text!r} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({err})") from None
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """The TrainConfig of a YAML file (None: all defaults) with dotted overrides applied in order."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, part in enumerate(keys[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {'.'.join(keys[:depth + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return _build(TrainConfig, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and empty mappings stay values."""
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dump_yaml(cfg))
    os.replace(tmp, path)
    return path
