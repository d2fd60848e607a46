import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="TRL is not installed (the benchmark's peer: pip install trl==1.16.0)")
def test_one_rl_step_of_each_side_reports_positive_numbers(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "tools" / "bench_rl_step.py"), "--steps", "1",
                          "--warmup-steps", "0", "--work-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {}
    for line in run.stdout.splitlines():
        match = re.match(r"(\S.*?)\s{2,}([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
        if match:
            rows[match.group(1)] = [float(v) for v in match.groups()[1:]]
    for label in ("s per RL step", "tokens/s"):
        ours, trl, ratio = rows[label]
        assert ours > 0 and trl > 0 and ratio == pytest.approx(trl / ours, rel=0.02), (label, rows[label])
    # 32 prompts x 8 samples: 5 prompt tokens each plus 1-8 completion tokens
    assert all(256 * 6 <= n <= 256 * 13 for n in rows["tokens per RL step"][:2])
    assert "not matched:" in run.stdout and "steps: 1 timed after 0 warm-up" in run.stdout
