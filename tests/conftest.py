"""Test-wide settings: one intra-op thread (gloo and the 2-core CI machines are far faster that way), GPU tests
skipped where no GPU exists, the fault table: each fault-injection test (marked `fault`; `make test-faults` runs
them alone) adds its row through the `fault_report` fixture, and the run's output ends with the table; and the
suite leaves no process behind: this process is made the "subreaper" of everything the tests start, so that an
orphan (a child of a killed run) is re-parented here rather than to init, and the session fails on any process
still running at its end."""

import contextlib
import ctypes
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The CPU demo's inputs (tools/prepare_demo.py), smaller prompt files: a warm-started tiny MoE + sort-digits."""
    spec = importlib.util.spec_from_file_location("prepare_demo", REPO / "tools" / "prepare_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prepare(tmp_path_factory.mktemp("demo"), train_size=2000, eval_size=16)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        if torch.cuda.device_count() < 2:  # NCCL runs one process per GPU (policy.parallel.spawn_local)
            skip = pytest.mark.skip(reason="2 processes need 2 GPUs under NCCL; this machine has 1")
            for item in items:
                if "multiprocess" in item.keywords:
                    item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(bytes) -> a folder on a tmpfs of that size (a real full disk for the fault tests), unmounted
    (lazily: a mapped file may still hold it) at the test's end. Skips where mounting needs root."""
    import subprocess

    mounted = []

    def mount(size: int) -> Path:
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(disk)
        return disk
    yield mount
    for disk in mounted:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


FAULT_ROWS: list[tuple[str, int, int, str, str]] = []


@pytest.fixture
def fault_report():
    """fault_report(fault, injected, survived, steps_lost, recover): one row of the table printed at the end of the
    run. steps_lost and recover are shown as given (a number, a list, or text such as "-" or "named error")."""
    def add(fault: str, injected: int, survived: int, steps_lost, recover) -> None:
        FAULT_ROWS.append((fault, injected, survived, str(steps_lost), str(recover)))
    return add


def pytest_terminal_summary(terminalreporter):
    if not FAULT_ROWS:
        return
    header = ("fault", "times injected", "survived", "steps lost", "time to recover")
    widths = [max(len(str(row[i])) for row in [header, *FAULT_ROWS]) for i in range(len(header))]
    terminalreporter.section("fault injection")
    for row in [header, tuple("-" * w for w in widths), *FAULT_ROWS]:
        terminalreporter.write_line(" | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


PR_SET_CHILD_SUBREAPER = 36


def pytest_sessionstart(session):
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # Linux; elsewhere a no-op


def pytest_sessionfinish(session, exitstatus):
    """Fail the session on any process the tests started that still runs: this process's children now (orphans
    included, see the module docstring), but for multiprocessing's resource tracker, which ends with this process.
    Those that end within 10 s are not survivors (a run killed by the last test may still be going down)."""
    from multiprocessing import resource_tracker

    from .runs import alive, process_tree

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    checkpoint = sys.modules.get("megatron_sapo.policy.checkpoint")
    if checkpoint is not None and checkpoint._write_results_manager is not None:
        checkpoint._write_results_manager.shutdown()  # kept for later saves by design; armed, it ends with us
    deadline = time.monotonic() + 10
    while True:
        while True:  # collect the orphans that have ended (zombies whose parent is now this process)
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        left = alive({pid: start for pid, start in process_tree(os.getpid()).items() if pid != tracker})
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        say = reporter.write_line if reporter else print
        if reporter:
            reporter.write_sep("=", "processes left behind", red=True)
        say(f"FAILED: {len(left)} processes started by the tests outlived them (now killed):")
        for pid, command in left.items():
            say(f"  pid {pid}: {command}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
