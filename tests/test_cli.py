import subprocess
import sys

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
