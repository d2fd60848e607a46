"""`compare` on run folders written by hand: groups, statistics over seeds and collapses against hand-computed
values; errors that name the problem."""

import json
import statistics

import pytest
import yaml

from megatron_sapo.analysis.compare import compare
from megatron_sapo.analysis.stability import StabilityConfig
from megatron_sapo.cli import main


def fake_run(folder, loss_type, seed, rewards, passes):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "output_dir": str(folder), "policy": {"seed": seed, "lr": 1e-3}, "data": {"seed": seed},
        "loss": {"loss_type": loss_type}, "tracking": {"run_name": folder.name}}))
    rows = [{"step": 0, "wall_time": 0.0, "eval/pass_at_1": passes[0]}]
    for step, reward in enumerate(rewards, 1):
        row = {"step": step, "wall_time": float(step), "reward/mean": reward, "train/grad_norm": 1.0,
               "time/step_s": 0.5, "entropy/sampled_nll": 1.0 - step / 100}
        if step % 10 == 0:
            row["eval/pass_at_1"] = passes[step // 10]
            row["time/eval_s"] = 0.25
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_groups_statistics_and_collapses_against_hand_values(tmp_path):
    stable = [0.2 + 0.01 * i for i in range(30)]
    collapsing = [0.2 + 0.04 * i for i in range(15)] + [0.05] * 15  # rises to 0.76, falls at step 16
    runs = [fake_run(tmp_path / "a1", "sapo", 1, stable, [0.1, 0.3, 0.5, 0.6]),
            fake_run(tmp_path / "a2", "sapo", 2, stable, [0.1, 0.4, 0.6, 0.8]),
            fake_run(tmp_path / "b1", "grpo", 1, collapsing, [0.1, 0.5, 0.2, 0.1]),
            fake_run(tmp_path / "b2", "grpo", 2, stable, [0.1, 0.5, 0.4, 0.3])]
    summary = compare(runs, tmp_path / "report", cfg=StabilityConfig(window=5), mlflow=False, say=lambda t: None)
    groups = summary["groups"]
    assert sorted(groups) == ["loss.loss_type=grpo", "loss.loss_type=sapo"]  # the seed keys do not split groups
    sapo, grpo = groups["loss.loss_type=sapo"], groups["loss.loss_type=grpo"]
    assert sapo["final_pass_at_1"]["mean"] == pytest.approx(0.7)
    assert sapo["final_pass_at_1"]["std"] == pytest.approx(statistics.stdev([0.6, 0.8]))
    assert grpo["best_pass_at_1"]["mean"] == pytest.approx(0.5)
    assert sapo["final_reward"]["mean"] == pytest.approx(statistics.fmean(stable[-5:]))
    assert (sapo["collapses"], grpo["collapses"]) == (0, 1)
    # b1's trailing mean of 5 first falls below 0.7 x its best at step 17: (3 rising values + 0.05 x 2) / 5
    assert grpo["collapse_steps"] == [17]
    assert sapo["seconds"]["mean"] == pytest.approx(30 * 0.5 + 3 * 0.25)
    assert sapo["entropy_last"]["mean"] == pytest.approx(statistics.fmean(1 - s / 100 for s in range(26, 31)))
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| loss.loss_type=grpo | 2 | 30 | 0.200 ± 0.141 | 0.500 ± 0.000 |" in table
    assert "| 1/2 | 17 |" in table


def test_runs_in_folders_of_the_same_name_stay_apart(tmp_path):
    a = fake_run(tmp_path / "sapo" / "seed1", "sapo", 1, [0.5] * 10, [0.1, 0.9])
    b = fake_run(tmp_path / "gspo" / "seed1", "gspo", 1, [0.5] * 10, [0.1, 0.3])
    summary = compare([a, b], tmp_path / "report", mlflow=False, say=lambda t: None)
    assert summary["groups"]["loss.loss_type=sapo"]["final_pass_at_1"]["mean"] == pytest.approx(0.9)
    assert summary["groups"]["loss.loss_type=gspo"]["final_pass_at_1"]["mean"] == pytest.approx(0.3)
    assert sorted(summary["runs"]) == sorted([str(a), str(b)])


def test_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(ValueError, match="neither a sweep folder"):
        compare([tmp_path], tmp_path / "r", mlflow=False)
    run = fake_run(tmp_path / "a", "sapo", 1, [0.1] * 3, [0.1])
    with pytest.raises(ValueError, match="give the report folder"):
        compare([run], mlflow=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "neither a sweep folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", str(run), "--out", str(tmp_path / "r"), "--drop", "1.5"])
    assert "drop must be a fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", str(tmp_path / "none.yaml")])
    assert "sweep file" in capsys.readouterr().err
