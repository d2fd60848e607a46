"""The sbatch recipes on a real one-node Slurm cluster (tools/slurm_cluster.sh, started once for this module).
recipes/tiny_cpu.sbatch runs the tiny recipe on 2 tasks with EP=2, checked through what it leaves behind (job
state, job log, checkpoints, the MLflow run): bad arguments fail the job before srun, a failing training step
fails it; the time-limit warning (SIGUSR1 to the batch shell) stops a run with a checkpoint, and the job requeues
itself and resumes; scancel (SIGTERM to every process) stops it with a checkpoint and MLflow status KILLED; a
resubmission resumes it to its end, all in one MLflow run. The shell scripts pass shellcheck. About 2 minutes,
mostly the trainer's start-ups.

Needs root, Slurm, munge and shellcheck (make slurm-env); without them the tests skip, unless SAPO_REQUIRE_SLURM=1
(make test sets it) turns that into a failure. What fails prints the job log and the daemons' logs."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megatron_sapo.policy.parallel import free_port

from .runs import run_env

REPO = Path(__file__).resolve().parents[1]
CLUSTER_TOOL = REPO / "tools" / "slurm_cluster.sh"
RECIPE = "recipes/tiny_cpu.sbatch"
CLUSTER_TOOLS = ("slurmctld", "slurmd", "munged", "sbatch")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")

pytestmark = pytest.mark.slow


def require(*tools: str, root: bool = False) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    problem = f"{', '.join(missing)} not installed (make slurm-env)" if missing else None
    if problem is None and root and os.geteuid() != 0:
        problem = "the local Slurm cluster runs its daemons and jobs as root"
    if problem is None:
        return
    if os.environ.get("SAPO_REQUIRE_SLURM") == "1":
        pytest.fail(f"SAPO_REQUIRE_SLURM=1 but {problem}")
    pytest.skip(problem)


class Cluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.env = run_env(SLURM_CONF=str(folder / "slurm.conf"), SAPO_SLURM_CTLD_PORT=str(free_port()),
                           SAPO_SLURM_NODE_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo",
                           PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def tool(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(CLUSTER_TOOL), action, str(self.folder)], env=self.env,
                              capture_output=True, text=True, timeout=60)

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(args, cwd=REPO, env={**self.env, **(env or {})}, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"
        return result.stdout

    def submit(self, log: Path, *args: str, env: dict[str, str] | None = None) -> str:
        return self.run("sbatch", "--parsable", f"--output={log}", *args, env=env).strip()

    def job(self, job_id: str) -> dict[str, str]:
        """The job's fields from scontrol (finished jobs stay there for MinJobAge)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "--oneliner", job_id)))

    def wait(self, job_id: str, states: set[str], log: Path, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            time.sleep(0.5)
        self.show_logs(log)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {job}")

    def show_logs(self, log: Path | None = None) -> None:
        """Printed, so that pytest shows them with a failure."""
        if log is not None:
            print(f"---- {log}\n{log.read_text() if log.exists() else '(none)'}")
        for name in ("slurmctld", "slurmd", "munged"):
            text = (self.folder / "log" / f"{name}.log").read_text()
            print(f"---- {name}.log (tail)\n{''.join(text.splitlines(keepends=True)[-40:])}")


@pytest.fixture(scope="module")
def cluster():
    require(*CLUSTER_TOOLS, root=True)
    # munged wants every folder above its socket searchable by all: not under pytest's private tmp folders
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="sapo-slurm-", dir="/tmp")))
    started = cluster.tool("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield cluster
    finally:
        stopped = cluster.tool("stop")
        if started.returncode or stopped.returncode:
            cluster.show_logs()
        assert stopped.returncode == 0, stopped.stderr
        assert cluster.tool("status").returncode == 1
        shutil.rmtree(cluster.folder, ignore_errors=True)


def tiny_args(demo: Path, out: Path, *overrides: str) -> list[str]:
    """recipes/tiny_cpu.sbatch on the test's demo inputs, 8 prompts a step, into `out`."""
    return [RECIPE, f"output_dir={out}", f"policy.model_path={demo / 'model'}",
            f"data.train_files=[{demo / 'train.jsonl'}]", f"data.eval_files=[{demo / 'eval.jsonl'}]",
            "data.prompts_per_step=8", "trainer.eval_prompts=16", *overrides]


def wait_for_steps(cluster: Cluster, job_id: str, out: Path, log: Path, steps: int, timeout: float = 120) -> None:
    """Until metrics.jsonl holds `steps` training steps (the run is past its start-up and its signal handlers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and cluster.job(job_id)["JobState"] not in ENDED:
        if len(logged_steps(out)) >= steps:
            return
        time.sleep(0.2)
    cluster.show_logs(log)
    raise AssertionError(f"job {job_id}: fewer than {steps} steps in {out / 'metrics.jsonl'}")


def wait_for_text(log: Path, text: str, cluster: Cluster, job_id: str, timeout: float = 120) -> str:
    """Until the job log holds `text`; returns the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and cluster.job(job_id)["JobState"] not in ENDED:
        if text in (content := log.read_text()):
            return content
        time.sleep(0.2)
    cluster.show_logs(log)
    raise AssertionError(f"job {job_id}: no {text!r} in {log}")


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [row["step"] for row in rows if "reward/mean" in row]


def latest_checkpoint(out: Path) -> dict:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return json.loads((out / "checkpoints" / latest / "megatron_sapo.json").read_text())


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    history = client.get_metric_history(runs[0].info.run_id, "reward/mean")
    return runs[0], sorted(m.step for m in history)


def test_scripts_pass_shellcheck():
    require("shellcheck")
    scripts = sorted(str(p.relative_to(REPO)) for p in [*(REPO / "recipes").glob("*.sbatch"),
                                                         *(REPO / "recipes").glob("*.sh"),
                                                         *(REPO / "tools").glob("*.sh")])
    assert RECIPE in scripts and "tools/slurm_cluster.sh" in scripts
    result = subprocess.run(["shellcheck", "--external-sources", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


GPU_RECIPE = ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "recipes/qwen3_30b_a3b_sapo.sbatch")


@pytest.mark.parametrize("recipe, override, env, error", [
    ((RECIPE,), "trainer.stepz=2", {}, "unknown key trainer.stepz"),
    ((RECIPE,), "policy.model_path=/nonexistent", {}, "policy.model_path /nonexistent is not a Hugging Face model"),
    (GPU_RECIPE, "trainer.steps=2", {}, "ROLLOUT_NODES=2 leaves no node to train on in 1: ask for more with --nodes"),
    (GPU_RECIPE, "trainer.steps=2", {"ROLLOUT_NODES": "two"}, "ROLLOUT_NODES must be a whole number >= 1, got 'two'"),
], ids=["unknown-key", "no-model", "gpu-no-training-node", "gpu-bad-env"])
def test_bad_arguments_fail_the_job_before_anything_starts(cluster, demo, tmp_path, recipe, override, env, error):
    log, out = tmp_path / "job.out", tmp_path / "run"
    job_id = cluster.submit(log, *recipe, f"policy.model_path={demo / 'model'}", f"output_dir={out}", override,
                            env=env)
    job = cluster.wait(job_id, {"COMPLETED", "FAILED"}, log, timeout=60)
    cluster.show_logs(log)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0"
    assert error in log.read_text()
    assert "srun" not in log.read_text() and not out.exists()


def test_a_failing_training_step_fails_the_job(cluster, demo, tmp_path):
    log = tmp_path / "job.out"
    job_id = cluster.submit(log, *tiny_args(demo, tmp_path / "run", "data.train_files=[/nonexistent.jsonl]"))
    job = cluster.wait(job_id, {"COMPLETED", "FAILED"}, log, timeout=120)
    cluster.show_logs(log)
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0"
    assert "data.train_files: no such file /nonexistent.jsonl" in log.read_text()
    assert "srun: error" in log.read_text()


def test_srun_tasks_join_one_process_group(cluster):
    """parallel.init_distributed under srun, one process per task: rank, world size and local rank (its GPU) come
    from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID."""
    code = ("import os, torch.distributed as dist; from megatron_sapo.policy.parallel import init_distributed; "
            "init_distributed(); print(dist.get_rank(), dist.get_world_size(), os.environ['LOCAL_RANK'])")
    out = cluster.run("srun", "--ntasks=2", f"--export=ALL,MASTER_ADDR=localhost,MASTER_PORT={free_port()}",
                      sys.executable, "-c", code)
    assert sorted(out.splitlines()) == ["0 2 0", "1 2 1"]


ASYNC = ("trainer.max_staleness=1",)  # the stop / resume test runs the asynchronous loop, the superset


def test_a_run_survives_a_time_limit_warning_and_a_cancel_in_one_mlflow_run(cluster, demo, tmp_path):
    """Asynchronous rollouts (trainer.max_staleness=1), 2 processes with EP=2. The time-limit warning (`--signal=B:USR1@60`; scancel --batch --signal=USR1 sends it now) stops the run with a
    checkpoint, and the job requeues itself and resumes. A plain scancel (SIGTERM to every process, SIGKILL KillWait
    later: 60 s on the test cluster) stops it with a checkpoint and MLflow status KILLED. A resubmission resumes it
    to its end. Each signal comes after a periodic checkpoint, whose helper processes must outlive it."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job_id = cluster.submit(log, *tiny_args(demo, out, "trainer.steps=200", "trainer.checkpoint_every=2", *ASYNC))
    wait_for_steps(cluster, job_id, out, log, 3)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    text = wait_for_text(log, "resuming from", cluster, job_id)
    warned = int(re.search(rf"stopped at step (\d+) of 200: requeueing job {job_id}", text).group(1))
    warned_checkpoint = out / "checkpoints" / f"step_{warned:08d}"
    assert f"checkpoint {warned_checkpoint}\nstopped at step {warned} on request" in text
    assert f"resuming from {warned_checkpoint}" in text and cluster.job(job_id)["Restarts"] == "1"
    assert "batch shell: SIGUSR1" in text and "received SIGUSR1: checkpointing after this step" in text

    wait_for_steps(cluster, job_id, out, log, warned + 2)
    cluster.run("scancel", job_id)
    cluster.wait(job_id, {"CANCELLED"}, log, timeout=90)
    cluster.show_logs(log)
    cancelled = latest_checkpoint(out)["extra"]["trainer_step"]
    run, steps = mlflow_run(out)
    # the latest checkpoint is the stop's own: it holds the last step logged
    assert run.info.status == "KILLED" and cancelled >= warned + 2 and steps == list(range(1, cancelled + 1))

    log = tmp_path / "resubmitted.out"
    total = cancelled + 2
    job_id = cluster.submit(log, *tiny_args(demo, out, f"trainer.steps={total}", *ASYNC))
    job = cluster.wait(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, log)
    cluster.show_logs(log)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0"
    text = log.read_text()
    assert f"resuming from {out / 'checkpoints' / f'step_{cancelled:08d}'}" in text and "(2 processes)" in text
    manifest = latest_checkpoint(out)
    assert manifest["world_size"] == 2 and manifest["extra"]["trainer_step"] == total
    resumed, steps = mlflow_run(out)
    assert resumed.info.run_id == run.info.run_id == manifest["extra"]["mlflow_run_id"]
    assert resumed.info.status == "FINISHED" and steps == list(range(1, total + 1))  # no step lost or redone
    assert logged_steps(out) == steps and resumed.data.params["policy.expert_model_parallel_size"] == "2"
    # asynchronous throughout: after each stop the batches generated ahead came back from the checkpoint (a restart
    # without them would sample its first batch by the newest weights: staleness 0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    staleness = [row["rollout/staleness"] for row in rows if "reward/mean" in row]
    assert staleness == [0] + [1] * (total - 1)


@pytest.mark.fault
def test_sglang_servers_started_by_the_trainer_outlive_the_stop_signals(cluster, demo, tmp_path, fault_report):
    """rollout.engine=sglang with the server started by the trainer, inside the training step, where Slurm signals
    every process. The time-limit warning (SIGUSR1, passed on to the step): the server ignores it
    (rollout/sglang_launch_shielded.py), the trainer's last step and checkpoint run on it without a restart, and the
    job requeues itself. After the resumed run's next checkpoint, scancel (SIGTERM to every process): the same, and
    the job ends CANCELLED at a checkpoint."""
    sglang_python = os.environ.get("SAPO_SGLANG_PYTHON", str(REPO / ".venv-sglang" / "bin" / "python"))
    if not Path(sglang_python).exists():
        pytest.skip("SGLang environment not installed (make sglang-env)")
    out, log = tmp_path / "run", tmp_path / "job.out"
    job_id = cluster.submit(log, *tiny_args(demo, out, "trainer.steps=200", "trainer.checkpoint_every=2",
                                            "trainer.eval_every=0", "rollout.engine=sglang",
                                            f"rollout.sglang.python={sglang_python}"))
    wait_for_steps(cluster, job_id, out, log, 3, timeout=300)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    signalled = time.monotonic()
    text = wait_for_text(log, "resuming from", cluster, job_id, timeout=300)
    warned_after = time.monotonic() - signalled
    warned = int(re.search(rf"stopped at step (\d+) of 200: requeueing job {job_id}", text).group(1))
    assert f"checkpoint {out / 'checkpoints' / f'step_{warned:08d}'}" in text

    wait_for_steps(cluster, job_id, out, log, warned + 2, timeout=300)
    cluster.run("scancel", job_id)
    signalled = time.monotonic()
    cluster.wait(job_id, {"CANCELLED"}, log, timeout=150)
    cancelled_after = time.monotonic() - signalled
    cluster.show_logs(log)
    text = log.read_text()
    assert "received SIGTERM: checkpointing after this step" in text
    assert latest_checkpoint(out)["extra"]["trainer_step"] > warned
    # no generation failed for a dead server, and the servers never handled a signal
    assert "is gone" not in text and "restarted" not in text and "does not answer" not in text, text[-3000:]
    served = (out / "logs" / "sglang_0.log").read_text(errors="replace")
    assert "SIGTERM received" not in served and "crashed" not in served, served[-3000:]
    fault_report("Slurm's time-limit warning (SIGUSR1) to a step with the trainer's SGLang server", 1, 1, 0,
                 f"checkpoint and requeue, {warned_after:.0f} s to the resumed run")
    fault_report("scancel (SIGTERM to every process) of a step with the trainer's SGLang server", 1, 1, 0,
                 f"checkpoint, CANCELLED {cancelled_after:.0f} s later")


def _process_of_rank(out: Path, rank: int) -> int | None:
    """The trainer process of SLURM_PROCID `rank` writing to `out` (its command line and environment, from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "megatron-sapo train" in cmdline and f"output_dir={out}" in cmdline \
                and f"SLURM_PROCID={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.fault
def test_a_stopped_rank_fails_the_job_instead_of_hanging_it(cluster, demo, tmp_path, fault_report):
    """The 2-task recipe with trainer.rank_timeout_s=10: the rank-1 trainer is stopped (SIGSTOP, as a frozen node
    would be) after two steps. Rank 0's watchdog names it and exits 75, srun --kill-on-bad-exit=1 ends the step, and
    the job is FAILED (so that it can be resubmitted or requeued) within a bounded time, not at its time limit."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job_id = cluster.submit(log, *tiny_args(demo, out, "trainer.steps=200", "trainer.checkpoint_every=1",
                                            "trainer.eval_every=0", "trainer.rank_timeout_s=10"))
    wait_for_steps(cluster, job_id, out, log, 2)
    pid = _process_of_rank(out, 1)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        job = cluster.wait(job_id, {"FAILED", "COMPLETED", "CANCELLED"}, log, timeout=150)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        # a helper the rank forked (same command line; its stop signals blocked) is orphaned by that SIGKILL, and
        # proctrack/linuxproc no longer counts it as the job's: end it here
        subprocess.run(["pkill", "-9", "-f", f"output_dir={out} "], check=False)
    ended = time.monotonic() - stopped
    cluster.show_logs(log)
    text = log.read_text()
    assert job["JobState"] == "FAILED", job
    assert f"megatron-sapo rank 0: rank 1 (host {os.uname().nodename}, pid {pid}) not heard from" in text, text[-3000:]
    assert "exiting with status 75" in text
    fault_report("a trainer rank SIGSTOPped under Slurm (2 tasks, rank_timeout_s=10)", 1, 1,
                 "since the last checkpoint", f"job FAILED {ended:.0f} s later")


def test_a_sweep_runs_as_a_job_array_resumes_a_warned_cell_and_skips_finished_ones(cluster, demo, tmp_path):
    """recipes/sweep.sbatch: two cells as a job array, each in its own folder and MLflow run of the sweep's
    experiment. The time-limit warning to one array task stops its cell with a checkpoint; the task requeues itself
    and its cell resumes in the same MLflow run. A resubmitted array finds both cells finished and does nothing; a
    submission without --array fails before anything starts."""
    out = tmp_path / "sweep"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(json.dumps({
        "name": "slurm_sweep", "config": str(REPO / "recipes" / "tiny_cpu.yaml"), "output_dir": str(out),
        "overrides": {"policy.model_path": str(demo / "model"), "data.train_files": [str(demo / "train.jsonl")],
                      "data.eval_files": [str(demo / "eval.jsonl")], "data.prompts_per_step": 8,
                      "trainer.eval_prompts": 16, "trainer.steps": 8, "trainer.eval_every": 4,
                      "trainer.checkpoint_every": 2},
        "seeds": [1], "grid": {"method": {"sapo": {"loss.loss_type": "sapo"}, "grpo": {"loss.loss_type": "grpo"}}}}))
    array = cluster.run("megatron-sapo", "sweep", str(sweep_file), "--array").strip()
    assert array == "0-1"
    log = tmp_path / "job-%a.out"
    job_id = cluster.submit(log, f"--array={array}", "recipes/sweep.sbatch", str(sweep_file))
    sapo, grpo = out / "cells" / "sapo" / "seed1", out / "cells" / "grpo" / "seed1"
    log0 = tmp_path / "job-0.out"
    wait_for_steps(cluster, f"{job_id}_0", sapo, log0, 3)
    cluster.run("scancel", "--batch", "--signal=USR1", f"{job_id}_0")
    text = wait_for_text(log0, "resuming from", cluster, f"{job_id}_0")
    assert re.search(r"stopped at step \d+ of 8: requeueing job \d+", text), text
    for task in (0, 1):
        job = cluster.wait(f"{job_id}_{task}", {"COMPLETED", "FAILED", "CANCELLED"}, tmp_path / f"job-{task}.out")
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
    cluster.show_logs(log0)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("slurm_sweep").experiment_id])
    assert sorted(r.data.tags["cell"] for r in runs) == ["grpo/seed1", "sapo/seed1"]  # the resumed cell: one run
    for run, folder in ((r, out / "cells" / r.data.tags["cell"]) for r in runs):
        assert run.info.status == "FINISHED"
        steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")})
        assert steps == list(range(1, 9)) and latest_checkpoint(folder)["extra"]["trainer_step"] == 8
    assert logged_steps(grpo) == list(range(1, 9))

    log = tmp_path / "again-%a.out"
    job_id = cluster.submit(log, f"--array={array}", "recipes/sweep.sbatch", str(sweep_file))
    for task in (0, 1):
        job = cluster.wait(f"{job_id}_{task}", {"COMPLETED", "FAILED"}, tmp_path / f"again-{task}.out", timeout=60)
        assert job["JobState"] == "COMPLETED"
        assert "has finished: nothing to do" in (tmp_path / f"again-{task}.out").read_text()

    log = tmp_path / "no-array.out"
    job_id = cluster.submit(log, "recipes/sweep.sbatch", str(sweep_file))
    job = cluster.wait(job_id, {"COMPLETED", "FAILED"}, log, timeout=60)
    assert job["JobState"] == "FAILED" and "not an array job" in log.read_text()
