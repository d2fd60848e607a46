"""A sweep: one training config, a grid of overrides and a list of seeds; each cell is a normal training run.

    name: paper_small                       # the MLflow experiment of every cell; the sweep's name in reports
    config: ../tiny_cpu.yaml                # the training config each cell starts from (relative to this file)
    output_dir: outputs/sweeps/paper_small  # the sweep's folder (relative to the working directory, as output_dir)
    overrides: {trainer.steps: 300}         # dotted keys set in every cell
    seeds: [1, 2, 3]                        # every group runs once per seed ...
    seed_keys: [policy.seed, data.seed]     # ... set into these keys (the default)
    grid:                                   # axes, crossed in order; the seed varies fastest
      method:                               # a named axis: a label and its overrides per value
        sapo: {loss.loss_type: sapo}
        grpo_r2: {loss.loss_type: grpo, policy.routing_replay: r2}
      policy.lr: [1.0e-3, 3.0e-3]           # a plain axis: a dotted key and its values
    launcher: []                            # a command put before each cell's `python -m megatron_sapo.cli train`,
                                            # e.g. [torchrun, --nproc_per_node, "2"]

A cell's folder is <output_dir>/cells/<group>/seed<N>, its group the labels of its axis values joined by "-" (a
plain axis labels a value by the key's last part and the value: lr0.001). Cells are numbered in grid order (the
Slurm array's task ids). Every cell's config is resolved, and checked, when the sweep is read: a bad override
stops the sweep before any cell runs, naming the cell. A cell's tracking: experiment `name`, run name the cell's
name, tags sweep / cell / group / seed and each axis's label, and a sqlite store shared by the sweep
(<output_dir>/mlflow/mlflow.db) unless the config or $MLFLOW_TRACKING_URI names another.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import TrainConfig, load_config, read_yaml_mapping

SWEEP_KEYS = ("name", "config", "output_dir", "overrides", "seeds", "seed_keys", "grid", "launcher")
DEFAULT_SEED_KEYS = ("policy.seed", "data.seed")
MANIFEST = "sweep.json"
_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_.+]")


@dataclass(frozen=True)
class Cell:
    index: int
    group: str  # the labels of its axis values, "-"-joined: cells of one group differ only by the seed
    seed: int
    labels: dict[str, str]  # axis name -> this cell's label on it
    overrides: dict[str, object]  # everything the sweep sets in this cell, in order
    output_dir: Path
    config: TrainConfig = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.group}/seed{self.seed}"


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path  # the sweep file
    config: Path  # the training config the cells start from
    output_dir: Path
    cells: tuple[Cell, ...]
    launcher: tuple[str, ...] = ()

    @property
    def groups(self) -> dict[str, list[Cell]]:
        out: dict[str, list[Cell]] = {}
        for cell in self.cells:
            out.setdefault(cell.group, []).append(cell)
        return out

    def select(self, indices: list[int] | None) -> list[Cell]:
        if indices is None:
            return list(self.cells)
        bad = [i for i in indices if not 0 <= i < len(self.cells)]
        if bad:
            raise ValueError(f"sweep {self.name} has cells 0-{len(self.cells) - 1}; no cell {bad[0]}")
        return [self.cells[i] for i in indices]

    def manifest(self) -> dict:
        """What `compare` and a reader need to know of the sweep without its file: the cells and their groups."""
        return {"name": self.name, "sweep_file": str(self.path), "config": str(self.config),
                "cells": [{"index": c.index, "name": c.name, "group": c.group, "seed": c.seed, "labels": c.labels,
                           "overrides": c.overrides, "output_dir": os.path.relpath(c.output_dir, self.output_dir)}
                          for c in self.cells]}


def _label(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return _LABEL_CHARS.sub("_", text) or "_"


def _axes(grid, where: str) -> list[tuple[str, list[tuple[str, dict]]]]:
    """[(axis name, [(label, overrides), ...]), ...] from the sweep's `grid` mapping."""
    if grid is None:
        return []
    if not isinstance(grid, dict):
        raise ValueError(f"{where}: grid must map axis names to a list of values or a mapping of labelled "
                         f"overrides, got {grid!r}")
    axes = []
    for axis, values in grid.items():
        if isinstance(values, list) and values:  # a plain axis: a dotted key and its values
            short = str(axis).rpartition(".")[2]
            axes.append((str(axis), [(f"{short}{_label(v)}", {str(axis): v}) for v in values]))
        elif isinstance(values, dict) and values:  # a named axis: label -> overrides
            options = []
            for label, overrides in values.items():
                if not isinstance(overrides, dict):
                    raise ValueError(f"{where}: grid.{axis}.{label} must be a mapping of dotted keys to values, "
                                     f"got {overrides!r}")
                if _label(str(label)) != str(label):
                    raise ValueError(f"{where}: grid.{axis} label {label!r} may hold only letters, digits, _ . +")
                options.append((str(label), {str(k): v for k, v in overrides.items()}))
            axes.append((str(axis), options))
        else:
            raise ValueError(f"{where}: grid.{axis} must be a non-empty list of values or a non-empty mapping of "
                             f"labels to overrides, got {values!r}")
    return axes


def _as_list(data: dict, key: str, where: str, default) -> list:
    value = data.get(key, default)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key} must be a non-empty list, got {value!r}")
    return value


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file and resolve every cell's training config (a ValueError names the file, key or cell)."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep file")
    where = f"sweep file {path}"
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]}; a sweep has: {', '.join(SWEEP_KEYS)}")
    for key in ("name", "config", "output_dir"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ValueError(f"{where}: {key} must be a non-empty string, got {data.get(key)!r}")
    name = data["name"]
    if _label(name) != name:
        raise ValueError(f"{where}: name {name!r} may hold only letters, digits, _ . +")
    config = path.parent / data["config"]
    if not config.is_file():
        raise ValueError(f"{where}: config {config} does not exist")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}: overrides must be a mapping of dotted keys to values, got {overrides!r}")
    seeds = _as_list(data, "seeds", where, [0])
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: seeds must be distinct integers, got {seeds!r}")
    seed_keys = _as_list(data, "seed_keys", where, list(DEFAULT_SEED_KEYS))
    launcher = data.get("launcher") or []
    if not isinstance(launcher, list) or not all(isinstance(a, (str, int)) for a in launcher):
        raise ValueError(f"{where}: launcher must be a list of command words, got {launcher!r}")
    out = Path(data["output_dir"])
    axes = _axes(data.get("grid"), where)
    store = None if "tracking.tracking_uri" in overrides else _shared_store(out, config)

    cells = []
    for combo in itertools.product(*(options for _, options in axes)):
        group = "-".join(label for label, _ in combo) or "base"
        labels = {axis: label for (axis, _), (label, _) in zip(axes, combo)}
        for seed in seeds:
            index = len(cells)
            cell_dir = out / "cells" / group / f"seed{seed}"
            sets = {**{str(k): v for k, v in overrides.items()}}
            for _, extra in combo:
                sets.update(extra)
            sets.update({key: seed for key in seed_keys})
            tags = {"sweep": name, "cell": f"{group}/seed{seed}", "group": group, "seed": str(seed), **labels}
            sets.update({"output_dir": str(cell_dir), "tracking.experiment": name,
                         "tracking.run_name": f"{name}/{group}/seed{seed}", "tracking.tags": tags})
            if store is not None:
                sets["tracking.tracking_uri"] = store
            try:
                cfg = load_config(config, [f"{k}={_yaml_value(v)}" for k, v in sets.items()])
            except ValueError as err:
                raise ValueError(f"{where}: cell {index} ({group}/seed{seed}): {err}") from None
            cells.append(Cell(index, group, seed, labels, sets, cell_dir, cfg))
    return Sweep(name, path, config, out, tuple(cells), tuple(str(a) for a in launcher))


def _yaml_value(value) -> str:
    """A value as the YAML text of a dotted override (load_config reads it back to the same value)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("\n...")


def _shared_store(out: Path, config: Path) -> str | None:
    """The sweep's own sqlite store, unless the cells' config or the environment names a tracking URI."""
    if os.environ.get("MLFLOW_TRACKING_URI") or load_config(config).tracking.tracking_uri:
        return None
    return "sqlite:///" + str((out / "mlflow" / "mlflow.db").resolve())
