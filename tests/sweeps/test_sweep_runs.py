"""Sweeps as users run them, with real training runs: the smoke version of the paper's sweep
(recipes/sweeps/paper_small.yaml: every method of it, one seed, 3 steps) through `megatron-sapo sweep`, its cells'
MLflow runs in one experiment, the report and the gate diagnostics; a stopped sweep resumed; `compare` on plain run
folders. About 3 minutes (the cells' start-ups, two at a time)."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ..runs import run_env

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "megatron-sapo")
PAPER = REPO / "recipes" / "sweeps" / "paper_small.yaml"

pytestmark = pytest.mark.slow


def smoke_sweep(demo: Path, tmp_path: Path, name: str, **changes) -> Path:
    """The paper sweep's file, made small: the demo fixture's inputs, one seed, 3 steps of 8 prompts."""
    data = yaml.safe_load(PAPER.read_text())
    data.update(config=str(PAPER.parent / data["config"]), output_dir=str(tmp_path / name), seeds=[1])
    data["overrides"].update({
        "policy.model_path": str(demo / "model"), "data.train_files": [str(demo / "train.jsonl")],
        "data.eval_files": [str(demo / "eval.jsonl")], "data.prompts_per_step": 8, "trainer.eval_prompts": 16,
        "trainer.steps": 3, "trainer.eval_every": 2, "trainer.checkpoint_every": 2, "trainer.gate_dump_steps": [2, 3]})
    data.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep(*args, timeout=900):
    result = subprocess.run([CLI, "sweep", *map(str, args)], cwd=REPO, env=run_env(), capture_output=True, text=True,
                            timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def client_of(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")


def test_the_paper_sweep_smoke_records_every_cell_and_writes_the_report(demo, tmp_path):
    path = smoke_sweep(demo, tmp_path, "paper_small")
    code, log = sweep(path, "--jobs", "2")
    assert code == 0, log[-5000:]
    out = tmp_path / "paper_small"
    groups = list(yaml.safe_load(PAPER.read_text())["grid"]["method"])
    assert len(groups) == 6

    # every cell trained to its end in its own folder, and is an MLflow run of the sweep's experiment, tagged
    client = client_of(out)
    experiment = client.get_experiment_by_name("paper_small")
    runs = client.search_runs([experiment.experiment_id])
    cells = {r.data.tags["cell"]: r for r in runs if "cell" in r.data.tags}
    assert sorted(cells) == sorted(f"{g}/seed1" for g in groups)
    for cell, run in cells.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["sweep"] == "paper_small" and run.data.tags["seed"] == "1"
        assert run.data.tags["method"] == cell.split("/")[0]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")] == [1, 2, 3]
        assert (out / "cells" / cell / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert cells["grpo_r2/seed1"].data.params["policy.routing_replay"] == "r2"
    assert cells["sapo_tneg0.95/seed1"].data.params["loss.tau_neg"] == "0.95"

    # the report: one row per method, finite numbers, the figures; logged to MLflow too
    table = (out / "report" / "report.md").read_text()
    for group in groups:
        assert f"| {group} | 1 | 3 |" in table
    summary = json.loads((out / "report" / "summary.json").read_text())
    for group in groups:
        g = summary["groups"][group]
        for key in ("final_pass_at_1", "best_pass_at_1", "final_reward", "seconds", "entropy_last"):
            assert math.isfinite(g[key]["mean"]), (group, key, g[key])
        assert g["seconds"]["mean"] > 0 and 0 <= g["final_pass_at_1"]["mean"] <= 1
    for figure in ("curves.png", "stability.png"):
        assert (out / "report" / figure).read_bytes().startswith(b"\x89PNG")
    compare_runs = [r for r in runs if r.data.tags.get("kind") == "compare"]
    assert len(compare_runs) == 1
    assert {a.path for a in client.list_artifacts(compare_runs[0].info.run_id, "compare")} >= {
        "compare/report.md", "compare/summary.json", "compare/curves.png"}

    # the gate diagnostics of a SAPO cell, from the dumps of steps 2 and 3
    sapo = out / "cells" / "sapo" / "seed1"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "plot_gate_diagnostics.py"), str(sapo)],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "step 2:" in result.stdout and "step 3:" in result.stdout
    assert (sapo / "plots" / "gate_diagnostics.png").is_file()

    # run again: nothing to do
    began = time.monotonic()
    code, log = sweep(path)
    assert code == 0, log
    assert log.count("finished before, skipped") == 6 and time.monotonic() - began < 60

    # compare on plain run folders: grouped by the config keys in which they differ, seed aside
    report = tmp_path / "plain"
    result = subprocess.run([CLI, "compare", str(out / "cells" / "sapo" / "seed1"),
                             str(out / "cells" / "gspo" / "seed1"), "--out", str(report), "--no-mlflow"],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    plain = json.loads((report / "summary.json").read_text())
    assert sorted(plain["groups"]) == ["loss.loss_type=gspo", "loss.loss_type=sapo"]


def test_a_running_cell_is_not_started_twice_and_a_stopped_sweep_resumes_it_in_the_same_run(demo, tmp_path):
    path = smoke_sweep(demo, tmp_path, "stopped", grid={"method": {"sapo": {"loss.loss_type": "sapo"}}})
    data = yaml.safe_load(path.read_text())
    # long enough that the second sweep below finds the cell still running
    data["overrides"].update({"trainer.steps": 60, "trainer.eval_every": 20, "trainer.checkpoint_every": 0,
                              "trainer.gate_dump_steps": []})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "stopped"
    metrics = out / "cells" / "sapo" / "seed1" / "metrics.jsonl"
    proc = subprocess.Popen([CLI, "sweep", str(path)], cwd=REPO, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):  # eval at 0, steps 1 and 2
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    code, busy = sweep(path)  # a second sweep over the same folder meanwhile: it must not start the cell again
    assert code == 1 and "another process is running it" in busy, busy
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the sweep passes it on as SIGTERM, the cell checkpoints
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, log
    assert "stopping the running cells" in log and "stopped at step" in log

    code, list_log = sweep(path, "--list")
    assert "started   sapo/seed1" in list_log
    code, log = sweep(path)
    assert code == 0, log
    assert "resuming from step" in log and "finished in" in log
    client = client_of(out)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("paper_small").experiment_id])
            if r.data.tags.get("kind") != "compare"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "reward/mean")})
    assert steps == list(range(1, 61))
