"""The training job's configuration: one dataclass per component, composed into `TrainConfig`, loaded from YAML and
overridden by dotted keys in OmegaConf's dotlist syntax (`trainer.steps=10 loss.loss_type=gspo`), as in verl and
NeMo-RL.

Each component owns its dataclass and its checks (policy/config.py, rollout/config.py, ...); this module only
assembles them, with the dataclasses as OmegaConf's structured-config schema. Loading is strict: an unknown key, a
value of the wrong type or one a component refuses is a ValueError that names the dotted key and the value, before
anything starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, InterpolationResolutionError,
                              OmegaConfBaseException, ValidationError)

from .atomic import write_atomic
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
    # asynchronous rollouts: how many weight versions the sampling weights may lag the trained policy. 0: synchronous
    # (each batch sampled by the weights of the step before); K > 0: batches are generated beside training, the
    # batch of step n by the weights after step n - 1 - K (1: one step off; the old log-probs are recomputed)
    max_staleness: int = 0
    # with several processes: a rank not heard from for this many seconds (killed, stopped, node lost) makes the
    # others exit with watchdog.EXIT_CODE instead of waiting in a collective for it (megatron_sapo/watchdog.py); 0: off
    rank_timeout_s: float = 120.0
    # steps (1-based) at which each update's per-token log-ratios are saved to output_dir/gate_dumps/, for the gate
    # diagnostics of tools/plot_gate_diagnostics.py (the paper's Figs. 2-3); costs one forward per mini-batch there
    gate_dump_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("trainer.advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        for name, low in (("steps", 1), ("mini_batches", 1), ("eval_every", 0), ("eval_prompts", 1),
                          ("eval_samples_per_prompt", 1), ("log_samples", 0), ("checkpoint_every", 0),
                          ("keep_checkpoints", 1), ("max_staleness", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"trainer.{name} must be an integer >= {low}, got {value!r}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.gate_dump_steps):
            raise ValueError(f"trainer.gate_dump_steps must be step numbers >= 1, got {list(self.gate_dump_steps)!r}")
        if self.eval_temperature is not None and not (math.isfinite(self.eval_temperature)
                                                      and self.eval_temperature > 0):
            raise ValueError(f"trainer.eval_temperature must be > 0 or null, got {self.eval_temperature!r}")
        if not (math.isfinite(self.rank_timeout_s) and self.rank_timeout_s >= 0):
            raise ValueError(f"trainer.rank_timeout_s must be >= 0 seconds (0: no rank watchdog), got "
                             f"{self.rank_timeout_s!r}")


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
# The dataclasses are OmegaConf's schema: it stores each value from the file and the overrides (an unknown key or a
# value of the wrong type stops there) and resolves interpolations; OmegaConf.to_object then builds the frozen
# dataclasses, whose __post_init__ checks the values. Every OmegaConf error becomes a ValueError in our words, naming
# the dotted key and the value.

def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """The TrainConfig of a YAML file (None: all defaults) with dotted overrides applied in order.

    Overrides are OmegaConf dotlist items, `key.sub=value` with the value read as YAML (`[a, b]`, `{k: v}`, `null`;
    an empty value is the empty string; a mapping given to a section merges into it). Values may interpolate others:
    `tracking.run_name=${output_dir}`. A file may start from another: `base: other.yaml` (relative to the file)
    applies that one first, then this file's keys over it (a list replaces the base's list)."""
    cfg = OmegaConf.structured(TrainConfig)
    _make_writable(cfg)
    if path is not None:
        for data in _read_recipe(Path(path)):
            _update(cfg, "", data)
    for text in overrides:
        _update(cfg, *split_override(text), override=text)
    return _instantiate(cfg)


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """A config file and the files it builds on (`base:`), base first."""
    if path.resolve() in seen:
        raise ValueError(f"config file {path} is its own base (through {' -> '.join(str(p) for p in seen)})")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    if base is None:
        return [data]
    if not isinstance(base, str):
        raise ValueError(f"config file {path}: base must be a file name, got {base!r}")
    return _read_recipe(path.parent / base, (*seen, path.resolve())) + [data]


def read_yaml_mapping(path: Path, what: str = "config file") -> dict:
    """The mapping a YAML file holds; a missing file, invalid YAML or another kind of value is a ValueError that
    names `what` and the path."""
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{what} {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a mapping, got {type(data).__name__}")
    return data


def split_override(text: str) -> tuple[str, object]:
    """'a.b=value' -> ('a.b', value read as YAML, as a config file's values are)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} is not of the form dotted.key=value")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({err})") from None


def _make_writable(node) -> None:
    """Frozen dataclasses give read-only nodes; the merges must write into them (the dataclasses stay frozen)."""
    OmegaConf.set_readonly(node, None)
    for value in node.values() if isinstance(node, DictConfig) else node:
        if isinstance(value, (DictConfig, ListConfig)):
            _make_writable(value)


def _instantiate(node: DictConfig, prefix: str = ""):
    """OmegaConf.to_object(node), with a component's refusal (a ValueError from its __post_init__) named by its
    dotted key. Inner sections are built first on their own so that each refusal is named at its own level; they are
    a handful of small dataclasses, so building them twice costs nothing."""
    cls = OmegaConf.get_type(node)
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            _instantiate(node[name], f"{prefix}{name}.")
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as err:  # an interpolation that does not resolve (ValidationError is a ValueError)
        raise _explain(err) from None
    except ValueError as err:
        raise _name_refusal(err, prefix, [f.name for f in dataclasses.fields(cls)]) from None


def _name_refusal(err: ValueError, prefix: str, names: list[str]) -> ValueError:
    """A component's message names its fields bare where the component is also used on its own (`loss_type`, not
    `loss.loss_type`): put the section in front."""
    message, section = str(err), prefix.rstrip(".")
    if not section or message.startswith(section):
        return err
    words = message.split(" ", 2)  # "x must be ..." or "unknown x 'v'; ...": name the dotted key x
    for i, word in enumerate(words[:2]):
        if word in names:
            words[i] = prefix + word
            return ValueError(" ".join(words))
    return ValueError(f"{section}: {message}")


def _update(cfg: DictConfig, key: str, value, override: str | None = None) -> None:
    """Set `key` to `value`: a mapping given to a section merges into it key by key, any other value replaces the
    old one (a list or a free-form mapping as a whole). Not OmegaConf's merge: it names a misplaced value without
    its key and lets a list of lists into a list of strings."""
    tp = _field_type(key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected {_describe(tp)}, got {value!r}")
        for name, item in value.items():
            _update(cfg, f"{key}.{name}" if key else str(name), item, override)
        return
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as err:
        if override and isinstance(err, ValidationError) and key.startswith(f"{err.full_key}."):
            raise ValueError(f"override {override!r}: {err.full_key} is not a section") from None
        raise _explain(err, _full_key(err, key)) from None


def _full_key(err: OmegaConfBaseException, key: str) -> str:
    """The dotted key of an error raised while setting `key`: OmegaConf names a value it cannot store (a YAML date in
    a free-form mapping) from inside the value being set."""
    inner = err.full_key or ""
    if not inner:
        return key
    if inner == key or inner.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{inner}."):
        return inner
    return f"{key}{inner}" if inner.startswith("[") else f"{key}.{inner}"


def _explain(err: OmegaConfBaseException, key: str | None = None) -> ValueError:
    key = err.full_key or "" if key is None else key
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)) and err.key is not None:
        section = key.rpartition(".")[0] if key.endswith(f".{err.key}") else ""
        owner = _field_type(section)
        if dataclasses.is_dataclass(owner):
            names = ", ".join(f.name for f in dataclasses.fields(owner))
            return ValueError(f"unknown key {key}; {section or 'the top level'} has: {names}")
        return ValueError(f"unknown key {key}")
    if isinstance(err, ValidationError) and not isinstance(err, InterpolationResolutionError):
        return ValueError(f"{key}: expected {_describe(_field_type(key))}, got {err.value!r}")
    message = str(err.msg).splitlines()[0] if err.msg else type(err).__name__
    return ValueError(f"{key}: {message}" if key else message)


def _field_type(key: str):
    """The annotation of a dotted key ('rollout.sglang.gpus[0]' -> int); typing.Any past a free-form mapping."""
    tp = TrainConfig
    for part in re.findall(r"[^.\[\]]+", key):
        tp = _strip_optional(tp)
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part, typing.Any)
        elif typing.get_origin(tp) in (list, tuple):
            tp = (typing.get_args(tp) or (typing.Any,))[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return typing.Any
    return tp


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _describe(tp) -> str:
    base = _strip_optional(tp)
    if dataclasses.is_dataclass(base):
        text = f"a mapping of {base.__name__} keys"
    elif base in (list, tuple) or typing.get_origin(base) in (list, tuple):
        text = "a list"
    elif base is dict or typing.get_origin(base) is dict:
        text = "a mapping"
    else:
        text = {bool: "true or false", int: "int", float: "a number", str: "a string"}.get(
            base, "a number, string, bool, list or mapping")  # typing.Any: inside a free-form mapping
    return text + (" or null" if base is not tp else "")


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
    """The config as YAML that load_config reads back to `cfg` (a literal `${` is escaped)."""
    return yaml.safe_dump(_escape_interpolations(to_dict(cfg)), sort_keys=False)


def _escape_interpolations(value):
    if isinstance(value, str):  # OmegaConf reads `\${` as a literal `${`, and `\\` before `${` as one backslash
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: _escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_interpolations(v) for v in value]
    return value


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    return write_atomic(path, dump_yaml(cfg))
