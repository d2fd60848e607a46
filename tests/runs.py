"""What the tests that start real runs share: their environment, and the process trees they leave."""

import os
import time
from pathlib import Path


def run_env(**extra: str) -> dict[str, str]:
    """A started run's environment: this one without $MLFLOW_TRACKING_URI (each run keeps its own MLflow store, not one
    the caller's environment points at), one intra-op thread, and `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc/PID/stat, None once it is gone. The start time (clock
    ticks since boot) tells a process from a later one that reuses its pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            children.setdefault(stat[1], []).append(int(entry))
    return children


def children(pid: int) -> list[int]:
    """The pids of process `pid`'s children now."""
    return _children_by_parent().get(pid, [])


def process_tree(root: int) -> dict[int, int]:
    """The descendants of process `root` now, as {pid: start time}."""
    children = _children_by_parent()
    found, todo = {}, list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if (stat := _stat(pid)) is not None:
            found[pid] = stat[2]
            todo += children.get(pid, ())
    return found


def alive(processes: dict[int, int]) -> dict[int, str]:
    """Those of `processes` ({pid: start time}) still running (not ended, not a zombie): {pid: command line}."""
    running = {}
    for pid, start in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[0] != "Z" and stat[2] == start:
            try:
                running[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            except OSError:
                continue
    return running


def time_to_end(processes: dict[int, int], timeout: float) -> float:
    """Seconds until none of `processes` runs; AssertionError naming the survivors after `timeout`."""
    began = time.monotonic()
    while (running := alive(processes)) and time.monotonic() - began < timeout:
        time.sleep(0.05)
    assert not running, f"still running {timeout:.0f} s later: {running}"
    return time.monotonic() - began
