"""Stop signals, and the helper processes they must not kill.

Under Slurm every process of a job step receives the signals meant for the trainer: SIGUSR1 before the time limit,
SIGTERM on scancel or preemption (and Ctrl-C reaches a terminal's whole process group). The trainer turns them into
a stop after its current step. A helper process that died of one would fail that step or the very checkpoint the
stop asks for: a reward worker, or the multiprocessing manager that Megatron's checkpoint writer starts at the first
save and keeps. Such helpers are started inside `shielded_children()`.
"""

from __future__ import annotations

import contextlib
import signal
from multiprocessing import resource_tracker

SHIELDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def shielded_children():
    """Child processes started in this block, by fork or by spawn, begin with the SHIELDED signals blocked (fork and
    exec keep the signal mask), so one of them stays pending there instead of killing the child.

    Only the calling thread's mask changes: the process itself still takes these signals through its other threads,
    Python's handlers included, or as soon as the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED)
    try:
        # multiprocessing's resource tracker, started with a process's first spawn, unblocks SIGINT and SIGTERM
        # behind itself: start it now, then block them again
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
