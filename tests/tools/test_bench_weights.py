import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SGLANG_PYTHON = os.environ.get("SAPO_SGLANG_PYTHON", str(REPO / ".venv-sglang" / "bin" / "python"))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_smallest_comparison_runs_and_shows_the_stream_holding_less(tmp_path):
    """Two processes, PP=2, one 33 MB model, 1 MB buckets, every path (the sync against a real SGLang server when
    its environment is installed): every measurement is there, and the streamed export's peak private memory is
    below round 1's, which held the whole model on rank 0."""
    sync = Path(SGLANG_PYTHON).exists()
    args = [sys.executable, str(REPO / "tools" / "bench_weights.py"), "--layers", "2", "--procs", "2", "--layout",
            "pp2", "--bucket-mb", "1", "--json", str(tmp_path / "rows.json"), *([] if sync else ["--no-sync"])]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    ops = ("load", "export", "sync") if sync else ("load", "export")
    for op in ops:
        for side in ("old", "new"):
            assert row[f"{op}/{side}"]["s"] > 0, (op, side)
    assert row["export/new"]["anon"] < row["export/old"]["anon"] / 2, row
    assert "new s/GB" in run.stdout and f"{row['model_mb']:>9.0f} export" in run.stdout
