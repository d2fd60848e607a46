import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_both_sides_run_and_the_table_adds_up(demo, tmp_path):
    """The smallest comparison (embedded engine, 3 steps of 4 prompts): both sides run, the asynchronous one samples
    its later batches one version behind, and the printed ratios are the columns' own."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "demo").symlink_to(demo)
    run = subprocess.run([sys.executable, str(REPO / "tools" / "bench_async.py"), "--engine", "embedded", "--steps",
                          "3", "--prompts-per-step", "4", "--work-dir", str(work)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {}
    for line in run.stdout.splitlines():
        match = re.match(r"(\S.*?)\s{2,}([\d.e+-]+)\s+([\d.e+-]+)\s*([\d.]*)$", line)
        if match:
            rows[match.group(1).strip()] = match.groups()[1:]
    sync, ahead, ratio = (float(v) for v in rows["s per step (mean)"])
    assert sync > 0 and ahead > 0 and ratio == pytest.approx(ahead / sync, rel=0.02, abs=0.01)
    staleness = [float(v) for v in rows["staleness (mean)"][:2]]  # printed to 4 digits
    assert staleness[0] == 0 and staleness[1] == pytest.approx(2 / 3, abs=1e-3)
    assert "expected step-time ratio from the synchronous parts" in run.stdout
