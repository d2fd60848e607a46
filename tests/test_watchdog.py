"""The rank watchdog (megatron_sapo/watchdog.py) with real processes and real signals. In the first tests, two
plain gloo ranks run `rank_main` below with a 3 s timeout. In the last test, a two-process `megatron-sapo train`
runs under torchrun and one of its ranks is SIGSTOPped: torchrun cannot see a stopped worker, so this is the hang
that the watchdog exists to end. Each test prints how long the watchdog took to end the job after the signal."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_sapo.policy.parallel import free_port
from megatron_sapo.watchdog import EXIT_CODE

from .runs import children, run_env
from .test_trainer import CLI, REPO, TORCHRUN

TIMEOUT = 3.0  # the unit tests' watchdog timeout; its interval is TIMEOUT / 4
WORKER = "import sys; from tests.test_watchdog import rank_main; rank_main(sys.argv[1], float(sys.argv[2]))"


def rank_main(scenario: str, timeout: float) -> None:
    """One rank of the unit tests, in a process of its own.
    barrier, asleep: rank 1 sleeps until the test stops or kills it, and rank 0 waits for it in a barrier or in a
    sleep (a wait that hears nothing of the peer's death, as on a node lost without a TCP reset: gloo's barrier
    itself fails at once when a local peer dies);
    normal: rank 1 sleeps 2 x timeout while rank 0 waits in a barrier; rank 1 then finishes and leaves, and rank 0
    goes on 2 x timeout longer before it finishes: neither may report the other."""
    import torch.distributed as dist

    from megatron_sapo.watchdog import RankWatchdog

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    watchdog = RankWatchdog(timeout)
    print("watching", flush=True)
    if scenario != "normal":
        if rank == 0 and scenario == "barrier":
            dist.barrier()
        time.sleep(600)
    if rank == 1:
        time.sleep(2 * timeout)
    dist.barrier()
    if rank == 0:
        time.sleep(2 * timeout)
    watchdog.stop()
    dist.destroy_process_group()


def _start_ranks(scenario: str) -> list[subprocess.Popen]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", WORKER, scenario, str(TIMEOUT)], cwd=REPO,
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in range(2)]
    for rank in ranks:
        assert rank.stdout.readline() == "watching\n", rank.communicate(timeout=60)
    return ranks


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig, victim, scenario", [(signal.SIGSTOP, 1, "barrier"), (signal.SIGKILL, 1, "asleep"),
                                                   (signal.SIGSTOP, 0, "barrier")],
                         ids=["SIGSTOP", "SIGKILL", "SIGSTOP-store-host"])
@pytest.mark.fault
def test_a_stopped_or_killed_rank_ends_the_rank_waiting_for_it(sig, victim, scenario, fault_report):
    """A rank is stopped or killed after a few beats; the other, waiting for it, exits with EXIT_CODE within the
    timeout plus about two intervals (the judge's period and the age of the store's last answer). Rank 0 keeps
    the store: when it is stopped, rank 1's calls to the store never return, and the store is reported."""
    ranks = _start_ranks(scenario)
    survivor = ranks[1 - victim]
    try:
        time.sleep(TIMEOUT)  # four beats each
        os.kill(ranks[victim].pid, sig)
        signalled = time.monotonic()
        _, err = survivor.communicate(timeout=TIMEOUT * 4)
        took = time.monotonic() - signalled
        print(f"\n{sig.name} of rank {victim}: rank {1 - victim} ended {took:.1f} s later (timeout {TIMEOUT} s)\n"
              f"{err.strip()}")
        assert survivor.returncode == EXIT_CODE, err
        lost = (f"rank 1 (host {socket.gethostname()}, pid {ranks[1].pid})" if victim == 1
                else "the rendezvous store (TCPStore 127.0.0.1:")
        assert f"megatron-sapo rank {1 - victim}: {lost}" in err and err.count("megatron-sapo") == 1, err
        assert TIMEOUT / 2 < took < TIMEOUT * 2 + 2, took
        who = "rank 1" if victim == 1 else "rank 0 (the store's host)"
        fault_report(f"{who} {sig.name} in a 2-process group (rank_timeout_s={TIMEOUT:g})", 1, 1, "-",
                     f"{took:.1f} s to a named exit {EXIT_CODE}")
    finally:
        for rank in ranks:
            rank.kill()
            rank.communicate()


@pytest.mark.multiprocess
def test_ranks_that_finish_at_different_times_are_not_reported():
    """Rank 0 waits 2 x timeout in a barrier (a collective releases the GIL: it keeps beating), then rank 1 says
    done and leaves while rank 0 goes on 2 x timeout longer: both exit 0 and neither says a word."""
    ranks = _start_ranks("normal")
    try:
        for rank in ranks:
            _, err = rank.communicate(timeout=TIMEOUT * 8)
            assert rank.returncode == 0 and "megatron-sapo" not in err, err
    finally:
        for rank in ranks:
            rank.kill()
            rank.communicate()


def _rank_of(pid: int) -> int | None:
    try:
        environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(item[5:]) for item in environ if item.startswith(b"RANK=")), None)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.fault
def test_a_stopped_trainer_rank_ends_the_torchrun_job(demo, tmp_path, fault_report):
    """`megatron-sapo train` on two processes under torchrun, trainer.rank_timeout_s=10. After the first step the
    rank-1 trainer is SIGSTOPped: torchrun sees nothing wrong with a stopped worker, and rank 0 would wait for it in
    the next collective for 30 min. Rank 0's watchdog ends it instead; torchrun then stops the stopped worker
    (SIGTERM, then SIGKILL 30 s later) and exits nonzero."""
    out = tmp_path / "run"
    command = [*TORCHRUN, CLI, "train", str(REPO / "recipes" / "tiny_cpu.yaml"), f"output_dir={out}",
               f"policy.model_path={demo / 'model'}", f"data.train_files=[{demo / 'train.jsonl'}]",
               f"data.eval_files=[{demo / 'eval.jsonl'}]", "data.prompts_per_step=8", "trainer.steps=50",
               "trainer.eval_every=0", "trainer.checkpoint_every=0", "tracking.enabled=false",
               "trainer.rank_timeout_s=10"]
    job = subprocess.Popen(command, cwd=REPO, env=run_env(GLOO_SOCKET_IFNAME="lo"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, stepped, reported = [], threading.Event(), []

    def read() -> None:  # so that the pipe never fills; flags the first finished step, times the watchdog's report
        for line in job.stdout:
            lines.append(line)
            if line.startswith("step ") and "/" in line:
                stepped.set()
            if "megatron-sapo rank" in line:
                reported.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    workers = {}
    try:
        assert stepped.wait(timeout=300), "".join(lines[-50:])
        workers = {_rank_of(pid): pid for pid in children(job.pid)}
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        code = job.wait(timeout=90)
        took = time.monotonic() - stopped
        reader.join(timeout=10)
        log = "".join(lines)
        lost = log[log.index("megatron-sapo rank 0:"):].splitlines()[0]
        print(f"\nSIGSTOP of the rank-1 trainer: rank 0 reported it {reported[0] - stopped:.1f} s later, torchrun "
              f"ended {took:.1f} s later\n{lost}")
        assert code != 0 and f"rank 1 (host {socket.gethostname()}, pid {workers[1]})" in lost, log[-5000:]
        assert f"exiting with status {EXIT_CODE}" in lost
        fault_report("a trainer rank SIGSTOPped, 2-process torchrun run (rank_timeout_s=10)", 1, 1,
                     "since the last checkpoint", f"{reported[0] - stopped:.1f} s to the report, {took:.0f} s to exit")
    finally:
        if job.poll() is None:
            job.kill()
        for pid in workers.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.wait()
