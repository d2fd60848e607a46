"""Running a sweep's cells on this machine, one after another (or `jobs` at a time), each as its own
`megatron-sapo train` process: Megatron's parallel state is process-global, so cells never share a process.

A cell's state is read from its folder, never from a ledger of the sweep's: finished when its newest checkpoint is at
the config's trainer.steps, started when it has a checkpoint or a metrics.jsonl, else new. Re-running the sweep
skips finished cells and lets the trainer resume unfinished ones from their checkpoints (the Slurm array of
recipes/sweep.sbatch does the same per task). Each cell's config is written to <cell>/sweep_cell.yaml before it runs;
a cell whose config changed since it started is refused (its folder would mix two configs), naming the cell.

SIGINT, SIGTERM or SIGUSR1 to the sweep is passed on to the running cells as SIGTERM: each finishes its step,
checkpoints and exits, and the sweep starts no more cells (run it again to continue). The cells run in sessions of
their own, so a Ctrl-C at the terminal reaches only the sweep, which stops them this way.

A running cell holds an exclusive lock on <cell>/.sweep.lock, inherited by its trainer: a second sweep over the same
folder (another terminal, or this one again after the first was killed while its trainers live on) skips that cell
instead of starting a second trainer on the same checkpoints.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..atomic import write_atomic
from ..config import dump_yaml
from ..progress import format_duration
from .spec import MANIFEST, Cell, Sweep

CELL_CONFIG = "sweep_cell.yaml"
CELL_LOG = "train.log"
CELL_LOCK = ".sweep.lock"


def cell_step(cell: Cell) -> int:
    """The step of the cell's newest checkpoint (0 without one)."""
    from ..policy.checkpoint import latest_checkpoint

    latest = latest_checkpoint(cell.output_dir / "checkpoints")
    return 0 if latest is None else int(latest.name.removeprefix("step_"))


def cell_state(cell: Cell) -> str:
    """finished | started | new."""
    if cell_step(cell) >= cell.config.trainer.steps:
        return "finished"
    if (cell.output_dir / "checkpoints").is_dir() or (cell.output_dir / "metrics.jsonl").is_file():
        return "started"
    return "new"


def write_manifest(sweep: Sweep) -> Path:
    import json

    return write_atomic(sweep.output_dir / MANIFEST, json.dumps(sweep.manifest(), indent=1) + "\n")


def prepare_cell(cell: Cell) -> Path:
    """Write the cell's resolved config to its folder and return its path; refuse a config that changed since the
    cell started."""
    path = cell.output_dir / CELL_CONFIG
    text = dump_yaml(cell.config)
    if path.is_file() and path.read_text() != text and cell_state(cell) != "new":
        raise ValueError(f"cell {cell.index} ({cell.name}) started with another config ({path}); remove "
                         f"{cell.output_dir} to run it again with the sweep's current one")
    return write_atomic(path, text)


def cell_command(sweep: Sweep, config: Path) -> list[str]:
    return [*sweep.launcher, sys.executable, "-m", "megatron_sapo.cli", "train", str(config)]


def logged_step(cell: Cell) -> int:
    """The last step in the cell's metrics.jsonl (0 before its first), read from the file's end."""
    path = cell.output_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        match = re.match(rb'\{"step": (\d+)', line)
        if match:
            return int(match.group(1))
    return 0


class SweepRunner:
    def __init__(self, sweep: Sweep, *, jobs: int = 1, say=print, progress_every_s: float = 60.0):
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        self.sweep, self.jobs, self.say, self.progress_every_s = sweep, jobs, say, progress_every_s
        self.stop_signal: int | None = None
        self.running: dict[int, tuple[Cell, subprocess.Popen, float]] = {}
        self.locks: dict[int, int] = {}  # cell index -> the fd of its held lock file
        self.durations: list[float] = []  # of the cells finished in this sweep run, for the estimate of what is left

    def run(self, cells: list[Cell]) -> list[Cell]:
        """Run the unfinished ones of `cells`; returns the cells that failed (empty: all finished). Stops starting
        cells after a stop signal (raising KeyboardInterrupt once the running ones have checkpointed)."""
        write_manifest(self.sweep)
        todo = []
        for cell in cells:
            state = cell_state(cell)
            if state == "finished":
                self.say(f"cell {cell.index} {cell.name}: finished before, skipped")
            else:
                prepare_cell(cell)  # every config checked before the first cell starts
                todo.append(cell)
        failed: list[Cell] = []
        began = time.monotonic()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM,
                                                                            signal.SIGUSR1)}
        shown = time.monotonic()
        try:
            queue = list(todo)
            while queue or self.running:
                while queue and len(self.running) < self.jobs and self.stop_signal is None:
                    self._start(queue.pop(0), done=len(todo) - len(queue), total=len(todo), failed=failed)
                self._reap(failed)
                if time.monotonic() - shown > self.progress_every_s and self.running:
                    shown = time.monotonic()
                    self._progress(len(queue))
                if self.stop_signal is not None and not self.running:
                    raise KeyboardInterrupt(f"the sweep stopped on {signal.Signals(self.stop_signal).name}; run the "
                                            "same command to continue (finished cells are skipped, the others "
                                            "resume from their checkpoints)")
                time.sleep(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.say(f"sweep {self.sweep.name}: {len(todo) - len(failed)} of {len(todo)} cells run in "
                 f"{format_duration(time.monotonic() - began)}" + (f", {len(failed)} failed" if failed else ""))
        return failed

    def _progress(self, queued: int) -> None:
        """One line: each running cell's step, and an estimate of the time left from the cells finished so far."""
        steps = {cell.index: (logged_step(cell), cell.config.trainer.steps) for cell, _, _ in self.running.values()}
        cells = ", ".join(f"{cell.name} step {steps[cell.index][0]}/{steps[cell.index][1]}"
                          for cell, _, _ in self.running.values())
        left = ""
        if self.durations:
            per_cell = sum(self.durations) / len(self.durations)
            to_do = queued + sum(1 - done / total for done, total in steps.values())
            left = f"; about {format_duration(per_cell * to_do / self.jobs)} left"
        self.say(f"sweep {self.sweep.name}: running {cells}; {queued} queued{left}")

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum
        self.say(f"sweep: {signal.Signals(signum).name}: stopping the running cells after their current step")
        for _, proc, _ in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def _start(self, cell: Cell, *, done: int, total: int, failed: list[Cell]) -> None:
        config = cell.output_dir / CELL_CONFIG
        log = cell.output_dir / CELL_LOG
        lock = os.open(cell.output_dir / CELL_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            failed.append(cell)
            self.say(f"cell {cell.index} {cell.name}: another process is running it ({cell.output_dir / CELL_LOCK} "
                     "is locked); skipped")
            return
        state = cell_state(cell)
        how = "new" if state == "new" else f"resuming from step {cell_step(cell)}"
        self.say(f"cell {cell.index} {cell.name} ({done}/{total}): {how}, log {log}")
        with open(log, "ab") as out:
            proc = subprocess.Popen(cell_command(self.sweep, config), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=(lock,),
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.running[cell.index] = (cell, proc, time.monotonic())
        self.locks[cell.index] = lock

    def _reap(self, failed: list[Cell]) -> None:
        for index, (cell, proc, began) in list(self.running.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.running[index]
            os.close(self.locks.pop(index))  # the trainer, which held it too, has exited
            took = format_duration(time.monotonic() - began)
            if code == 0 and cell_state(cell) == "finished":
                self.durations.append(time.monotonic() - began)
                self.say(f"cell {cell.index} {cell.name}: finished in {took}")
            elif code == 0:
                self.say(f"cell {cell.index} {cell.name}: stopped at step {cell_step(cell)} after {took}")
            else:
                failed.append(cell)
                tail = _tail(cell.output_dir / CELL_LOG)
                self.say(f"cell {cell.index} {cell.name}: FAILED with exit code {code} after {took}; the end of "
                         f"{cell.output_dir / CELL_LOG}:\n{tail}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"    (cannot read it: {err})"
