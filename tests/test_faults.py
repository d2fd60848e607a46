"""Fault injection into real runs of `megatron-sapo train` (issue 15): the whole job SIGKILLed at random moments, the
run's MLflow store locked by another process, the trainer's SGLang server killed and hung during distributed weight
updates, and corrupted inputs. (Other faults are tested beside the code they hit: tests/rewards, tests/rollout,
tests/loop, tests/policy, tests/test_trainer.py, tests/test_watchdog.py and tests/test_slurm.py; every fault test is
marked `fault` and adds its row to the table printed at the end of the run, `make test-faults`.)

The demo run (embedded engine, a checkpoint every step, so the kills land in generation, training, weight exports
and checkpoint writes alike) is started and its trainer SIGKILLed (the process alone, as the OOM killer takes it)
at a seeded random moment, or, every other time, while Megatron's forked writers write a checkpoint, again and
again; the trainer's children (reward worker, Megatron's writers and their manager) must end with it within
seconds (lifeline.py), and each rerun of the same command must resume from the newest complete checkpoint, whose
manifest is whole, and lose only the steps after it. A last rerun finishes, and a rerun of the finished run says so
and exits 0. Printed: injections, steps lost each time, seconds to the first step after the restart, seconds until
the last child ended. A step's metrics are logged before its checkpoint is written, so a kill that loses one step
landed while that checkpoint was being written.

The trainer SIGKILLed with other children is below: with its SGLang server (and, attached by URL, a server it did
not start, which must live on), with the embedded engine in a process of its own, and on two processes."""

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .runs import alive, children, process_tree, run_env, time_to_end
from .test_trainer import CLI, REPO, SGLANG_PYTHON

pytestmark = [pytest.mark.fault, pytest.mark.slow]

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


def _kill_the_trainer(job, *, in_a_checkpoint: bool) -> tuple[float, int, bool]:
    """SIGKILL the trainer alone, now or (in_a_checkpoint) as soon as a forked checkpoint writer of it runs; then
    (seconds until none of its descendants ran, how many it had, whether a forked writer was among them)."""
    command = Path(f"/proc/{job.pid}/cmdline").read_bytes()
    began = time.monotonic()
    while True:
        tree = process_tree(job.pid)
        forked = any(Path(f"/proc/{pid}/cmdline").read_bytes() == command for pid in alive(tree))
        if forked or not in_a_checkpoint or time.monotonic() - began > 60 or job.poll() is not None:
            break
        time.sleep(0.005)
    if job.poll() is None:
        os.kill(job.pid, signal.SIGKILL)
    job.wait()
    return time_to_end(tree, timeout=5), len(tree), forked


def test_the_trainer_killed_at_random_moments_resumes_and_leaves_nothing_behind(demo, tmp_path, fault_report):
    out = tmp_path / "run"
    env = run_env()
    rng = random.Random(15)
    lost, recover, killed_at, cleanup, in_checkpoint = [], [], [], [], 0
    for injection in range(KILLS):
        resumed_from = _latest(out)
        began = time.monotonic()
        job = subprocess.Popen(_command(demo, out), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            stepped = threading.Event()
            reader = threading.Thread(target=_watch, args=(job, stepped), daemon=True)
            reader.start()
            first_step = time.monotonic() - began if stepped.wait(timeout=300) else None
            # a random point of the steps that follow (generation, updates, weight export or checkpoint writing),
            # or every other time a checkpoint write
            time.sleep(rng.uniform(0.0, 2.5))
            took, descendants, forked = _kill_the_trainer(job, in_a_checkpoint=injection % 2 == 1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)  # after a failure: nothing of it stays behind
        reader.join(timeout=10)
        reached = max(_steps_logged(out), default=0)
        assert reached < STEPS, "the run ended before the injection"
        assert first_step is not None, f"injection {injection}: the rerun never reached a step"
        assert descendants >= 3, descendants  # a reward worker, Megatron's writer manager, the resource tracker
        latest = _latest(out)
        assert latest >= resumed_from, (injection, latest, resumed_from)
        lost.append(reached - latest)
        recover.append(first_step)
        killed_at.append(reached)
        cleanup.append(took)
        in_checkpoint += forked
    final = subprocess.run(_command(demo, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert f"step {STEPS}/{STEPS}" in final.stdout + final.stderr
    assert sorted(set(_steps_logged(out))) == list(range(1, STEPS + 1))
    again = subprocess.run(_command(demo, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"already at step {STEPS} of {STEPS}" in again.stdout + again.stderr
    assert all(0 <= n <= 1 for n in lost), lost  # a checkpoint every step: at most the step in flight
    assert in_checkpoint >= KILLS // 2, in_checkpoint
    print(f"\nSIGKILL of the trainer: {len(lost)} injections at steps {killed_at} ({in_checkpoint} while a forked "
          f"checkpoint writer ran), steps lost {lost}, seconds to the first step after each restart "
          f"{[round(s, 1) for s in recover]}, seconds until its last child ended {[round(s, 2) for s in cleanup]}")
    fault_report("the trainer SIGKILLed at a random moment (checkpoint every step)", len(lost), len(lost),
                 f"{sum(lost)} in all, at most {max(lost)}",
                 f"{sum(recover) / len(recover):.1f} s mean to the next step")
    fault_report(f"  its children then (embedded engine; {in_checkpoint} kills in a checkpoint write)", len(lost),
                 len(lost), "-", f"all ended within {max(cleanup):.2f} s")


LOCKER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def test_a_locked_mlflow_store_holds_up_nothing_and_loses_nothing(demo, tmp_path, fault_report):
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
    env = run_env()
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
    fault_report("the MLflow sqlite store locked by another process for 30 s", 1, 1, 0,
                 f"{len(during)} steps trained meanwhile; all sent at the next start")


def _listen_backlog(port: int) -> int:
    """Connections waiting to be accepted on a listening TCP port (/proc/net/tcp*, rx_queue of a LISTEN socket): the
    requests that a stopped server has not taken."""
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                waiting += int(fields[4].split(":")[1], 16)
    return waiting


def _server_pid(port: int) -> int:
    found = subprocess.run(["pgrep", "-f", f"sglang_launch_shielded.py .*--port {port}( |$)"], capture_output=True,
                           text=True).stdout.split()
    assert len(found) == 1, found
    return int(found[0])


STEPS_SG = 8


def _answered(log: Path) -> int:
    """/generate requests a CPU SGLang server has answered (its access log), less its own warm-up request."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return text.count('"POST /generate HTTP/1.1" 200') - text.count("Uvicorn running on")


def _until(condition, timeout: float, what: str, lines: list, job) -> float:
    began = time.monotonic()
    while not condition():
        assert job.poll() is None, f"the run ended (exit {job.returncode}) before {what}:\n" + "".join(lines)[-3000:]
        assert time.monotonic() - began < timeout, f"not within {timeout} s: {what}\n" + "".join(lines)[-3000:]
        time.sleep(0.1)
    return time.monotonic()


@pytest.mark.skipif(not Path(SGLANG_PYTHON).exists() and not os.environ.get("SAPO_SGLANG_PYTHON"),
                    reason="SGLang environment not installed (make sglang-env)")
def test_sglang_killed_and_hung_during_distributed_weight_updates(demo, tmp_path, fault_report):
    """A run with the trainer's own SGLang server and the distributed weight sync. Step 2's update: the server is
    stopped once it has answered step 2's generation, and SIGKILLed while the update's first request waits on it.
    Step 3's update: the restarted server is stopped and stays stopped (hung). Each time the sync fails (a reset
    connection; no answer within update_timeout_s), the step's weights go through a folder, the engine finds the
    server dead or not answering /health (hang_timeout_s), restarts it from that folder under the new version, and the
    run goes on: every step is trained, and steps 3 and 4 are generated by exactly the trainer's weights (the
    engine's log-probs equal the trainer's old log-probs), so the restarted server serves the right weights."""
    out = tmp_path / "run"
    per_step = 8 * 8  # prompts x samples: /generate requests per step
    command = [c for c in _command(demo, out) if not c.startswith(("trainer.steps", "trainer.checkpoint"))]
    # micro-batches of one sample: a longer learner, so that the server is stopped between a step's generation
    # and its weight update (when the stop comes too late, the server goes on and the next step is tried)
    command += [f"trainer.steps={STEPS_SG}", "trainer.checkpoint_every=0", "policy.micro_batch_size=1",
                "rollout.engine=sglang",
                f"rollout.sglang.python={SGLANG_PYTHON}", "rollout.sglang.weight_sync=distributed",
                "rollout.sglang.request_timeout_s=20", "rollout.sglang.hang_timeout_s=5",
                "rollout.sglang.update_timeout_s=10"]
    # unbuffered: the server's access log (its stdout) shows each answered request at once, the injections' clock
    env = run_env(PYTHONUNBUFFERED="1")
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    lines: list[str] = []
    stamps: list[tuple[float, str]] = []

    def read():
        for line in job.stdout:
            lines.append(line)
            stamps.append((time.monotonic(), line))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    log = out / "logs" / "sglang_0.log"

    def stepped(step: int) -> bool:
        return any(line.startswith(f"step {step}/{STEPS_SG}") for line in list(lines))

    try:
        _until(lambda: any("starting SGLang server 0 on port" in line for line in lines), 300, "server start", lines,
               job)
        port = int(next(line for line in lines if "starting SGLang server 0 on port" in line).split("port ")[1]
                   .split()[0])
        recover, faults, step, hit = [], ["killed", "hung"], 2, {}
        while faults:
            assert step < STEPS_SG, f"no injection landed in a weight update (missed up to step {step})"
            _until(lambda: _answered(log) >= step * per_step, 300, f"step {step}'s generation", lines, job)
            pid = _server_pid(port)
            os.killpg(pid, signal.SIGSTOP)
            _until(lambda: _listen_backlog(port) > 0 or stepped(step), 120, f"step {step}'s weight update", lines,
                   job)
            time.sleep(0.5)  # the step's line, printed before the next generation, is read by now if it came
            if stepped(step):  # the update was through before the stop: continue it, try at the next step
                os.killpg(pid, signal.SIGCONT)
                step += 1
                continue
            injected = time.monotonic()  # the step's weight update waits on the stopped server
            fault = faults.pop(0)
            if fault == "killed":
                time.sleep(1.0)
                os.killpg(pid, signal.SIGKILL)
            _until(lambda: stepped(step), 300, f"step {step}", lines, job)
            recover.append(time.monotonic() - injected)
            hit[fault] = step
            assert _server_pid(port) != pid
            step += 1
        assert job.wait(timeout=600) == 0, "".join(lines)[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", f"sglang_launch_shielded.py .*{out}"], check=False)
        reader.join(timeout=10)
        (tmp_path / "train.log").write_text("".join(f"{t:.1f} {line}" for t, line in stamps))
    text = "".join(lines)
    assert text.count("distributed weight sync failed") == 2, text[-3000:]
    assert f"step {STEPS_SG}/{STEPS_SG}" in text
    rows = {r["step"]: r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == list(range(1, STEPS_SG + 1))
    for step in hit.values():  # the next batch comes from the restarted server: the trainer's own weights
        assert rows[step + 1]["mismatch/abs_diff_max"] < 2e-5, (step, rows[step + 1]["mismatch/abs_diff_max"])
    assert "restarted (2 restarts in this run)" in text and "restarted (3 restarts" not in text, text[-3000:]
    assert all(rows[step]["rollout/stale_frac"] == 0 for step in rows)  # every sample under the due version
    fault_report("SGLang server SIGKILLed during a distributed weight update", 1, 1, 0, f"{recover[0]:.0f} s")
    fault_report("SGLang server hung (SIGSTOP) during a distributed weight update", 1, 1, 0, f"{recover[1]:.0f} s")


def _other_model_checkpoint(rank, model_dir, root):
    from megatron_sapo.policy.checkpoint import save_checkpoint
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy

    save_checkpoint(Policy(PolicyConfig(model_path=model_dir)), os.path.join(root, "checkpoints"))


def test_corrupted_inputs_are_named_before_training_starts(demo, tmp_path, fault_report):
    """`megatron-sapo train` on damaged inputs, one real run each: a truncated model safetensors, a config.json of
    another model beside the weights, a prompt file with broken rows (skipped and counted by default, an error naming
    file and line with data.on_malformed=error), and an output_dir holding another model's checkpoint. Each run
    exits nonzero with an error that names the problem, before any step; the broken rows' default run trains."""
    import shutil

    from megatron_sapo.policy.parallel import spawn_local

    from .policy.harness import tiny_models

    def model_copy(name):
        path = tmp_path / name
        shutil.copytree(demo / "model", path)
        return path

    truncated = model_copy("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    other = tmp_path / "other"
    tiny_models().build("qwen3_moe", other, hidden_size=32, seed=3)
    wrong_config = model_copy("wrong_config")
    shutil.copy(tmp_path / "other" / "config.json", wrong_config / "config.json")
    prompts = tmp_path / "broken.jsonl"
    rows = (demo / "train.jsonl").read_text().splitlines()[:200]
    prompts.write_text("\n".join(rows[:50] + ["{not json", '"a string"', '{"prompt": 3}'] + rows[50:]) + "\n")
    foreign = tmp_path / "foreign"
    spawn_local(_other_model_checkpoint, 1, str(other), str(foreign))

    env = run_env()
    base = [c for c in _command(demo, tmp_path / "run") if not c.startswith(("trainer.steps", "output_dir"))]
    cases = {
        "a truncated model safetensors": ([f"policy.model_path={truncated}"], "model.safetensors is not a readable"),
        "a config.json of another model": ([f"policy.model_path={wrong_config}"], "shape"),
        "a prompt file with broken rows (data.on_malformed=error)":
            ([f"data.train_files=[{prompts}]", "data.on_malformed=error"], "broken.jsonl:51"),
        "a checkpoint of another model in output_dir": ([f"output_dir={foreign}"], "holds another model"),
    }
    for fault, (overrides, named) in cases.items():
        out = [f"output_dir={tmp_path / fault.split()[1]}"] if not any(o.startswith("output_dir") for o in overrides) \
            else []
        began = time.monotonic()
        run = subprocess.run([*base, *out, "trainer.steps=2", *overrides], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
        took = time.monotonic() - began
        said = run.stdout + run.stderr
        assert run.returncode != 0 and named in said and "step 1/" not in said, (fault, said[-3000:])
        fault_report(f"corrupted input: {fault}", 1, 1, 0, f"named error after {took:.0f} s")
    run = subprocess.run([*base, f"output_dir={tmp_path / 'skipping'}", "trainer.steps=1",
                          f"data.train_files=[{prompts}]"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    said = run.stdout + run.stderr
    assert run.returncode == 0 and "skipped 3 malformed prompt rows" in said and "step 1/1" in said, said[-3000:]
    fault_report("corrupted input: a prompt file with broken rows (default: skipped)", 1, 1, 0,
                 "3 rows skipped, counted")


def _started(command: list[str], env: dict) -> tuple[subprocess.Popen, list[str]]:
    """A run started in a session of its own, its output read into a list by a thread."""
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True).start()
    return job, lines


def _killed_mid_generation(job, lines: list, log: Path, per_step: int) -> tuple[float, dict]:
    """SIGKILL the trainer once the server at `log` has answered some but not all of step 2's requests (they go one
    at a time); (seconds until its descendants ended, the descendants it had)."""
    _until(lambda: _answered(log) > per_step + 2, 300, "step 2's generation", lines, job)
    tree = process_tree(job.pid)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert _answered(log) < 2 * per_step, "the kill came after step 2's generation"
    return time_to_end(tree, timeout=5), tree


@pytest.mark.skipif(not Path(SGLANG_PYTHON).exists() and not os.environ.get("SAPO_SGLANG_PYTHON"),
                    reason="SGLang environment not installed (make sglang-env)")
def test_a_trainer_sigkilled_mid_generation_takes_its_sglang_server_along_and_leaves_an_attached_one(
        demo, tmp_path, fault_report):
    """The trainer SIGKILLed while its own SGLang server generates step 2's batch: the server (the shielded launcher,
    its scheduler and detokenizer) and the trainer's other children end within seconds. Then a trainer attached by
    URL to a server it did not start, SIGKILLed the same way: its children end, the server answers on."""
    from .rollout.test_sglang import cpu_server

    per_step = 8 * 8
    slow = ["rollout.engine=sglang", f"rollout.sglang.python={SGLANG_PYTHON}", "rollout.sglang.concurrency=1",
            "trainer.checkpoint_every=1"]
    own_out = tmp_path / "own"
    job, lines = _started([*_command(demo, own_out), *slow], run_env(PYTHONUNBUFFERED="1"))
    try:
        took, tree = _killed_mid_generation(job, lines, own_out / "logs" / "sglang_0.log", per_step)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", f"sglang_launch_shielded.py .*{own_out}"], check=False)
    assert len(tree) >= 5, tree  # launcher, scheduler, detokenizer, reward worker, resource trackers, ...
    print(f"\ntrainer SIGKILLed mid-generation: its {len(tree)} descendants (its SGLang server's among them) ended "
          f"within {took:.2f} s")
    fault_report("the trainer SIGKILLed mid-generation: its own SGLang server", 1, 1, "-",
                 f"{len(tree)} descendants ended within {took:.2f} s")

    attached = cpu_server(demo / "model", tmp_path / "attached.log")
    attached.start()
    try:
        out = tmp_path / "attached_run"
        job, lines = _started([*_command(demo, out), *slow, f"rollout.sglang.urls=[{attached.url}]"],
                              run_env(PYTHONUNBUFFERED="1"))
        try:
            took, tree = _killed_mid_generation(job, lines, attached.log_path, per_step)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
        assert attached.alive() and attached.responsive(timeout=30), "the attached server did not outlive the run"
    finally:
        attached.stop()
    fault_report("the trainer SIGKILLed mid-generation: a server attached by URL", 1, 1, "-",
                 f"its {len(tree)} descendants ended within {took:.2f} s, the server answers on")


@pytest.mark.multiprocess
def test_a_rank_sigkilled_on_two_processes_leaves_nothing_behind(demo, tmp_path, fault_report):
    """Two trainer processes under torchrun, asynchronous rollouts (rank 0's embedded engine in a process of its
    own, generating the next batch beside training): rank 0 is SIGKILLed after step 2. Its children (engine
    process, reward worker, Megatron's writer manager) end within seconds; rank 1 and torchrun follow (torchrun
    stops the remaining worker), and nothing of the job runs afterwards."""
    from .test_trainer import TORCHRUN
    from .test_watchdog import _rank_of

    out = tmp_path / "run"
    job, lines = _started([*TORCHRUN, *_command(demo, out), "trainer.max_staleness=1", "trainer.rank_timeout_s=10"],
                          run_env(GLOO_SOCKET_IFNAME="lo"))
    try:
        _until(lambda: any(line.startswith(f"step 2/{STEPS}") for line in lines), 300, "step 2", lines, job)
        everything = process_tree(job.pid)
        rank0 = next(pid for pid in children(job.pid) if _rank_of(pid) == 0)
        tree = process_tree(rank0)
        os.kill(rank0, signal.SIGKILL)
        killed = time.monotonic()
        took = time_to_end(tree, timeout=5)
        job.wait(timeout=120)
        job_ended = time.monotonic() - killed
        time_to_end(everything, timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert len(tree) >= 4, tree  # engine process, reward worker, writer manager, resource tracker
    fault_report("a rank SIGKILLed, 2-process torchrun run (async engine process on it)", 1, 1, "-",
                 f"its {len(tree)} descendants ended within {took:.2f} s; the whole job in {job_ended:.0f} s")
