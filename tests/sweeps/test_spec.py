"""Sweep files: the cells they make (order, groups, folders, configs, tracking) and the errors they give."""

from pathlib import Path

import pytest
import yaml

from megatron_sapo.sweeps.runner import cell_state, logged_step, prepare_cell
from megatron_sapo.sweeps.spec import load_sweep

REPO = Path(__file__).resolve().parents[2]


def write_sweep(tmp_path, **changes):
    data = {"name": "s1", "config": str(REPO / "recipes" / "tiny_cpu.yaml"), "output_dir": str(tmp_path / "out"),
            "overrides": {"trainer.steps": 7}, "seeds": [3, 4],
            "grid": {"method": {"sapo": {"loss.loss_type": "sapo"},
                                "grpo_r2": {"loss.loss_type": "grpo", "policy.routing_replay": "r2"}},
                     "policy.lr": [1.0e-3, 3.0e-3]}}
    data.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False))
    return path


def test_cells_cross_the_axes_in_order_with_the_seed_fastest(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = load_sweep(write_sweep(tmp_path))
    assert [c.name for c in sweep.cells] == [
        f"{m}-lr{lr}/seed{s}" for m in ("sapo", "grpo_r2") for lr in ("0.001", "0.003") for s in (3, 4)]
    assert [c.index for c in sweep.cells] == list(range(8))
    assert list(sweep.groups) == ["sapo-lr0.001", "sapo-lr0.003", "grpo_r2-lr0.001", "grpo_r2-lr0.003"]
    cell = sweep.cells[5]  # grpo_r2, lr 0.001, seed 4
    cfg = cell.config
    assert (cfg.loss.loss_type, cfg.policy.routing_replay, cfg.policy.lr) == ("grpo", "r2", 1.0e-3)
    assert (cfg.policy.seed, cfg.data.seed, cfg.trainer.steps) == (4, 4, 7)
    assert Path(cfg.output_dir) == tmp_path / "out" / "cells" / "grpo_r2-lr0.001" / "seed4"
    assert cfg.tracking.experiment == "s1" and cfg.tracking.run_name == "s1/grpo_r2-lr0.001/seed4"
    assert cfg.tracking.tags == {"sweep": "s1", "cell": "grpo_r2-lr0.001/seed4", "group": "grpo_r2-lr0.001",
                                 "seed": "4", "method": "grpo_r2", "policy.lr": "lr0.001"}
    assert cfg.tracking.tracking_uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow' / 'mlflow.db').resolve()}"
    manifest = sweep.manifest()
    assert manifest["cells"][5]["output_dir"] == "cells/grpo_r2-lr0.001/seed4"


def test_a_tracking_uri_of_the_environment_or_the_sweep_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert load_sweep(write_sweep(tmp_path)).cells[0].config.tracking.tracking_uri is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    path = write_sweep(tmp_path, overrides={"tracking.tracking_uri": "http://other:5000"})
    assert load_sweep(path).cells[0].config.tracking.tracking_uri == "http://other:5000"


def test_no_grid_is_one_group_of_seeds(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, grid=None, seeds=[1, 2, 3]))
    assert [c.name for c in sweep.cells] == ["base/seed1", "base/seed2", "base/seed3"]


@pytest.mark.parametrize("changes, message", [
    ({"gird": {}}, "unknown key gird; a sweep has: name, config"),
    ({"name": None}, "name must be a non-empty string"),
    ({"name": "a b"}, "may hold only letters"),
    ({"config": "missing.yaml"}, "config .*missing.yaml does not exist"),
    ({"seeds": [1, 1]}, "seeds must be distinct integers"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"grid": {"method": []}}, "grid.method must be a non-empty list"),
    ({"grid": {"method": {"a": "loss.loss_type=sapo"}}}, "grid.method.a must be a mapping"),
    ({"grid": {"method": {"sapo": {"loss.loss_typ": "sapo"}}}},
     r"cell 0 \(sapo/seed3\): unknown key loss.loss_typ"),
    ({"grid": {"loss.tau_neg": [1.0, -1.0]}}, r"cell 2 \(tau_neg_1.0/seed3\): loss.tau_neg must be"),
    ({"launcher": "torchrun"}, "launcher must be a list"),
])
def test_bad_sweep_files_are_refused_naming_the_problem(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write_sweep(tmp_path, **changes))


def test_a_missing_sweep_file_and_an_unknown_cell(tmp_path):
    with pytest.raises(ValueError, match="sweep file .*nope.yaml does not exist"):
        load_sweep(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="has cells 0-7; no cell 8"):
        load_sweep(write_sweep(tmp_path)).select([8])


def test_a_started_cell_refuses_a_changed_config(tmp_path):
    cell = load_sweep(write_sweep(tmp_path)).cells[0]
    assert cell_state(cell) == "new"
    prepare_cell(cell)
    assert logged_step(cell) == 0
    (cell.output_dir / "metrics.jsonl").write_text('{"step": 0, "eval/pass_at_1": 0.1}\n{"step": 1}\n{"st')
    assert cell_state(cell) == "started" and logged_step(cell) == 1  # a line cut short is skipped
    changed = load_sweep(write_sweep(tmp_path, overrides={"trainer.steps": 9})).cells[0]
    with pytest.raises(ValueError, match=r"cell 0 \(sapo-lr0.001/seed3\) started with another config"):
        prepare_cell(changed)
    prepare_cell(cell)  # the same config again is fine


def test_the_progress_line_names_each_running_cell_step_and_estimates_the_time_left(tmp_path):
    from megatron_sapo.sweeps.runner import SweepRunner

    sweep = load_sweep(write_sweep(tmp_path))  # 7 steps per cell
    lines = []
    runner = SweepRunner(sweep, jobs=2, say=lines.append)
    for cell, step in zip(sweep.cells[:2], (0, 7)):
        cell.output_dir.mkdir(parents=True)
        rows = "".join(f'{{"step": {s}, "wall_time": 0}}\n' for s in range(step + 1))
        (cell.output_dir / "metrics.jsonl").write_text(rows)
        runner.running[cell.index] = (cell, None, 0.0)
    runner._progress(queued=3)
    assert lines[-1] == "sweep s1: running sapo-lr0.001/seed3 step 0/7, sapo-lr0.001/seed4 step 7/7; 3 queued"
    runner.durations = [100.0, 140.0]  # 120 s a cell; 3 queued + 1 + 0 cells left to run, 2 at a time
    runner._progress(queued=3)
    assert lines[-1].endswith("; 3 queued; about 4m00s left")


def test_a_cell_locked_by_another_process_is_skipped_not_run_twice(tmp_path):
    import fcntl
    import os

    from megatron_sapo.sweeps.runner import CELL_LOCK, SweepRunner

    sweep = load_sweep(write_sweep(tmp_path))
    cell = sweep.cells[0]
    cell.output_dir.mkdir(parents=True)
    held = os.open(cell.output_dir / CELL_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a trainer of an earlier sweep, still running, holds it
    lines = []
    try:
        failed = SweepRunner(sweep, say=lines.append).run([cell])
    finally:
        os.close(held)
    assert failed == [cell]
    assert any("another process is running it" in line for line in lines)
    assert not (cell.output_dir / "train.log").exists()
