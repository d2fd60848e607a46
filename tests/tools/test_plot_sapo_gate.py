import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_figure_is_written_and_weights_match_paper(tmp_path):
    out = tmp_path / "fig" / "gate.png"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "plot_sapo_gate.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "w(2)=0.786" in run.stdout and "w(5)=0.071" in run.stdout and "w(5)=0.058" in run.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert not list(out.parent.glob(".*tmp*")), "the temporary file of the atomic write was left behind"
