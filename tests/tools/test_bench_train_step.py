import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"1 process\s+(\w+)\s+real/computed\s+([\d.]+)\s+micro-batches\s+(\d+)\s+step\s+([\d.]+) ms .*"
                  r"activations\s+([\d.]+) MiB")


@pytest.mark.slow
def test_budget_bounds_a_micro_batchs_activations():
    """The benchmark on a bimodal batch, one process: the budget path computes mostly real tokens, the packed one
    only real tokens, and the largest micro-batch of either saves about budget / (rows x longest row) of the padded
    path's activations (128 of 4 x 128 positions: a quarter, with attention's scores, which grow with the square of
    the width, a little less)."""
    run = subprocess.run([sys.executable, str(REPO / "tools" / "bench_train_step.py"), "--lengths", "bimodal",
                          "--max-len", "128", "--batch", "8", "--micro-batch", "4", "--budget", "128", "--steps", "1",
                          "--worlds", "1"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {m.group(1): [float(v) for v in m.groups()[1:]] for m in map(LINE.search, run.stdout.splitlines()) if m}
    assert set(rows) == {"padded", "budget", "packed"}, run.stdout
    (p_eff, p_mbs, p_ms, p_act), (b_eff, b_mbs, b_ms, b_act) = rows["padded"], rows["budget"]
    k_eff, _, k_ms, k_act = rows["packed"]
    assert p_mbs == 2 and b_eff > 0.9 > 0.5 > p_eff and k_eff == 1.0 and min(p_ms, b_ms, k_ms) > 0
    assert 0.1 * p_act < b_act <= 0.27 * p_act and k_act <= 0.27 * p_act, (b_act, k_act, p_act)
