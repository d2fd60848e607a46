import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sapo.cli import main


def test_gate_prints_paper_weight(capsys):
    assert main(["gate", "--tau", "1", "--ratios", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["1", "2", "2.9242", "0.7864"]


def test_gate_rejects_non_positive_tau(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["gate", "--tau", "0"])
    assert exc.value.code == 2 and "tau must be a finite number > 0" in capsys.readouterr().err


def test_console_script_help_and_info():
    run = subprocess.run([sys.executable, "-m", "megatron_sapo.cli", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "info" in run.stdout and "gate" in run.stdout
    run = subprocess.run([sys.executable, "-m", "megatron_sapo.cli", "info"], capture_output=True, text=True)
    assert run.returncode == 0 and "megatron-core" in run.stdout and "0.1.0" in run.stdout


def test_train_and_plot_help_and_errors(tmp_path, capsys):
    run = subprocess.run([sys.executable, "-m", "megatron_sapo.cli", "--help"], capture_output=True, text=True)
    assert "train" in run.stdout and "plot" in run.stdout
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "KEY=VALUE" in out and "torchrun" in out
    with pytest.raises(SystemExit) as exc:
        main(["train", str(tmp_path / "none.yaml")])
    assert exc.value.code == 2 and "none.yaml does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", str(Path(__file__).parents[1] / "recipes" / "tiny_cpu.yaml"), f"policy.model_path={tmp_path}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is not a Hugging Face model folder" in err and "tools/prepare_demo.py" in err
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(tmp_path)])
    assert exc.value.code == 2 and "holds no metrics.jsonl" in capsys.readouterr().err
