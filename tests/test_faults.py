"""Fault injection into real runs of `megatron-sapo train` (issue 15): the whole job SIGKILLed at random moments, and
the run's MLflow store locked by another process. (Other faults are tested beside the code they hit: a reward worker
killed while idle in tests/rewards, a full disk under a checkpoint in tests/test_trainer.py and under an export in
tests/policy/test_hf_stream.py, a SGLang server killed mid-batch in tests/rollout/test_sglang.py.)

The demo run (embedded engine, a checkpoint every step, so the kills land in generation, training, weight exports
and checkpoint writes alike) is started and SIGKILLed (its whole process group, as a node failure or the OOM killer
takes it) at a seeded random moment, again and again; each rerun of the same command must resume from the newest
complete checkpoint, whose manifest is whole, and lose only the steps after it. A last rerun finishes, and a rerun
of the finished run says so and exits 0. Printed: injections, steps lost each time, seconds to the first step after
the restart. A step's metrics are logged before its checkpoint is written, so a kill that loses one step landed
while that checkpoint was being written (measured: 6 of the 10, the others in generation, updates or exports)."""

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

from .test_trainer import CLI, REPO

STEPS = 60  # more than the kills can get through: every injection lands before the end
KILLS = 10


def _command(demo: Path, out: Path) -> list[str]:
    return [CLI, "train", str(REPO / "recipes" / "tiny_cpu.yaml"), f"output_dir={out}",
            f"policy.model_path={demo / 'model'}", f"data.train_files=[{demo / 'train.jsonl'}]",
            f"data.eval_files=[{demo / 'eval.jsonl'}]", "data.prompts_per_step=8", f"trainer.steps={STEPS}",
            "trainer.checkpoint_every=1", "trainer.eval_every=0", "tracking.enabled=false"]


def _steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line cut by the kill: the recorder drops it on resume
            pass
    return steps


def _latest(out: Path) -> int:
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return 0
    folder = out / "checkpoints" / pointer.read_text().strip()
    manifest = json.loads((folder / "megatron_sapo.json").read_text())  # whole: never a partial checkpoint
    return manifest["extra"]["trainer_step"]


def _watch(job, stepped: threading.Event) -> None:
    """Read the job's output (so that its pipe never fills) and flag its first finished step."""
    for line in job.stdout:
        if line.startswith("step ") and "/" in line:
            stepped.set()


def test_the_job_killed_at_random_moments_resumes_from_its_last_checkpoint(demo, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1")
    rng = random.Random(15)
    lost, recover, killed_at = [], [], []
    for injection in range(KILLS):
        resumed_from = _latest(out)
        began = time.monotonic()
        job = subprocess.Popen(_command(demo, out), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
        stepped = threading.Event()
        reader = threading.Thread(target=_watch, args=(job, stepped), daemon=True)
        reader.start()
        first_step = time.monotonic() - began if stepped.wait(timeout=300) else None
        # a random point of the steps that follow: generation, updates, weight export or checkpoint writing
        time.sleep(rng.uniform(0.0, 2.5))
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        reader.join(timeout=10)
        reached = max(_steps_logged(out), default=0)
        assert reached < STEPS, "the run ended before the injection"
        assert first_step is not None, f"injection {injection}: the rerun never reached a step"
        latest = _latest(out)
        assert latest >= resumed_from, (injection, latest, resumed_from)
        lost.append(reached - latest)
        recover.append(first_step)
        killed_at.append(reached)
    final = subprocess.run(_command(demo, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert f"step {STEPS}/{STEPS}" in final.stdout + final.stderr
    assert sorted(set(_steps_logged(out))) == list(range(1, STEPS + 1))
    again = subprocess.run(_command(demo, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"already at step {STEPS} of {STEPS}" in again.stdout + again.stderr
    assert all(0 <= n <= 1 for n in lost), lost  # a checkpoint every step: at most the step in flight
    print(f"\nSIGKILL of the whole job: {len(lost)} injections at steps {killed_at}, steps lost {lost}, "
          f"seconds to the first step after each restart {[round(s, 1) for s in recover]}")


LOCKER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def test_a_locked_mlflow_store_holds_up_nothing_and_loses_nothing(demo, tmp_path):
    """Another process holds the run's sqlite MLflow store locked (BEGIN EXCLUSIVE) for 30 s, longer than MLflow's
    own 20 s busy timeout and than the rest of the run: the steps go on during the lock, and after the next start of
    the same command (a rerun of the finished run) every step's metrics are in the store: nothing is lost."""
    import sys

    from .test_trainer import mlflow_run, steps_of

    out = tmp_path / "run"
    steps = 30
    command = _command(demo, out)
    command = [c for c in command if not c.startswith(("tracking.enabled", "trainer.steps", "trainer.checkpoint"))]
    command += [f"trainer.steps={steps}", "trainer.checkpoint_every=0", "tracking.retry_interval_s=1"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1")
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, stepped = [], threading.Event()

    def read():
        for line in job.stdout:
            lines.append((time.monotonic(), line))
            if line.startswith("step "):
                stepped.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert stepped.wait(timeout=300), "".join(line for _, line in lines)[-3000:]
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(out / "mlflow" / "mlflow.db"), "30"],
                              stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    locked_at = time.monotonic()
    assert job.wait(timeout=600) == 0, "".join(line for _, line in lines)[-3000:]
    reader.join(timeout=10)
    locker.wait(timeout=60)
    during = [line for t, line in lines if locked_at < t < locked_at + 25 and line.startswith("step ")]
    assert len(during) >= 5, "training waited for the tracking store"
    # a run that ends inside the lock leaves what the store did not take in metrics.jsonl (marked as not sent) and
    # pending.jsonl; the next start of the same command, here a rerun of the finished run, sends them
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"already at step {steps} of {steps}" in again.stdout + again.stderr
    client, run = mlflow_run(out)
    assert [s for s, _ in steps_of(client, run, "reward/mean")] == list(range(1, steps + 1))
    assert run.info.status == "FINISHED"
