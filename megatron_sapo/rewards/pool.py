"""The reward pool: runs a reward function over a batch of samples in worker processes, each call under a timeout.

A reward function is user code (or sympy on adversarial input): it may raise, hang, crash its process or return
garbage. Any of that must cost the one sample, never the training run, and be counted so that it shows in the
metrics. `multiprocessing.Pool` and `concurrent.futures.ProcessPoolExecutor` cannot do that: neither can stop one
hung call (the first leaves the worker busy for ever, the second breaks the whole executor when a worker dies).
So each worker here is one process with one pipe; the parent waits on all pipes at once and, when a call passes its
deadline, kills that worker (SIGKILL) and starts a replacement. A worker is sent several samples ahead (up to
IN_FLIGHT_BYTES of them, at least one), so it goes from one call to the next without waiting for the parent: the
round trip per sample (two process wake-ups) is paid once per batch of them instead. It computes them in order, so
the oldest unanswered sample is the one running: its deadline starts when the previous answer arrives, and when it
passes, that sample is timed out and the ones queued behind it go to other workers (or the replacement).

Costs: per sample, one pickled message each way. Workers are started with "spawn", because the parent holds torch
threads (and on a GPU node a CUDA context) that a forked child must not inherit. A spawned worker re-imports the
parent's `__main__` module (multiprocessing's rule: the entry script needs its `if __name__ == "__main__"` guard,
and what it imports at top level every worker imports too: ~0.3 s under pytest or the `megatron-sapo` command,
~2 s for a script that imports torch), then this package (~0.1 s) and the reward function. Calls go only to a
worker that has reported ready, so start-up never counts against a call's timeout, and a replacement starts while
the other workers go on: a hang costs its batch about `timeout_s`, not a pool restart.

A worker that dies between batches (killed, out of memory) is replaced before the next batch, and one found dead when
a sample is sent to it gets its unstarted samples moved to the others: only a death during a call costs a sample.

Outcomes of one call, as counted in `RewardStats`: ok; raised (an exception, `SystemExit` included); timed_out;
invalid (a return value that is not a real number, or is NaN / infinite; a bool counts as 0 / 1); crashed (the
worker died in the call, e.g. a segfault). Every outcome but ok yields `failure_reward`.
"""

from __future__ import annotations

import math
import multiprocessing
import numbers
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from .. import lifeline
from ..signals import SHIELDED, shielded_children
from .config import RewardConfig
from .registry import resolve_reward

MAX_ERRORS = 5  # error messages kept per batch: enough to diagnose, bounded for logs
MAX_ERROR_CHARS = 300
STARTUP_TIMEOUT_S = 120.0  # a worker that has not imported its reward function by then is an error, not a hang
# samples sent ahead to a worker, by size: well below a pipe's buffer (64 KiB on Linux), so that sending them never
# blocks the parent on a worker that hangs
IN_FLIGHT_BYTES = 16 << 10

OUTCOMES = ("ok", "raised", "timed_out", "invalid", "crashed")

_CONTEXT = multiprocessing.get_context("spawn")


@dataclass
class RewardStats:
    """What happened to the calls of one `RewardPool.score` batch (outcomes as in the module docstring)."""

    ok: int = 0
    raised: int = 0
    timed_out: int = 0
    invalid: int = 0
    crashed: int = 0
    errors: list[str] = field(default_factory=list)  # the failures of the lowest MAX_ERRORS indices, "sample i: ..."

    @property
    def failed(self) -> int:
        return self.raised + self.timed_out + self.invalid + self.crashed

    @classmethod
    def of(cls, results: list[tuple[str, float | str]]) -> RewardStats:
        """The stats of a batch's (outcome, reward or error message) per sample, in input order."""
        counts = Counter(outcome for outcome, _ in results)
        failures = [(i, message) for i, (outcome, message) in enumerate(results) if outcome != "ok"]
        errors = [f"sample {i}: {message}"[:MAX_ERROR_CHARS] for i, message in failures[:MAX_ERRORS]]
        return cls(**{name: counts[name] for name in OUTCOMES}, errors=errors)


def _call_reward(function, completion: str, answer: str, kwargs: dict) -> tuple[str, float | str]:
    try:
        value = function(completion, answer, **kwargs)
    except BaseException as exc:  # SystemExit too: a reward function must not end its worker
        return "raised", f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    try:
        reward = float(value) if isinstance(value, numbers.Real) else math.nan
    except OverflowError:  # an int beyond the float range
        reward = math.inf
    if not math.isfinite(reward):
        return "invalid", f"returned {type(value).__name__} {repr(value)[:100]}"
    return "ok", reward


def _worker_main(conn, parent: int, function_name: str, function_kwargs: dict) -> None:
    lifeline.arm(parent, name=f"reward worker {os.getpid()}")  # a hung call must not outlive the trainer
    # Ctrl-C reaches the whole process group, and Slurm signals every process of a job step: the parent decides
    # what they mean (megatron_sapo.signals)
    for sig in SHIELDED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SHIELDED)
    try:
        function = resolve_reward(function_name)
    except BaseException as exc:
        conn.send(("init_failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        index, completion, answer, extra = task
        conn.send((index, *_call_reward(function, completion, answer, {**function_kwargs, **extra})))


class _Worker:
    """One worker process, its pipe, and the samples sent to it and not answered yet (the first one is running)."""

    def __init__(self, config: RewardConfig) -> None:
        self.conn, child_conn = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(
            target=_worker_main,
            args=(child_conn, os.getpid(), config.function, config.function_kwargs),
            name="reward-worker",
            daemon=True,
        )
        with shielded_children():  # until the worker ignores them
            self.process.start()
        child_conn.close()
        self.ready = False
        self.startup_deadline = time.monotonic() + STARTUP_TIMEOUT_S
        self.sent: deque[int] = deque()
        self.sent_bytes = 0
        self.deadline = math.inf  # of the running sample

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def _check_sample(index: int, sample, function_kwargs: dict) -> tuple[str, str, dict]:
    if not isinstance(sample, (tuple, list)) or len(sample) != 3:
        raise ValueError(f"sample {index} must be a (completion, answer, extra) triple, got {type(sample).__name__}")
    completion, answer, extra = sample
    if not isinstance(completion, str) or not isinstance(answer, str):
        raise ValueError(
            f"sample {index}: completion and answer must be str, got {type(completion).__name__} and "
            f"{type(answer).__name__}"
        )
    if not isinstance(extra, Mapping):
        raise ValueError(f"sample {index}: extra must be a mapping, got {type(extra).__name__}")
    overlap = sorted(function_kwargs.keys() & extra.keys())
    if overlap:
        raise ValueError(f"sample {index}: extra keys {overlap} are also set in rewards.function_kwargs")
    return completion, answer, dict(extra)


class RewardPool:
    """`config.num_workers` processes running the reward `config.function`; use as a context manager or `close()`.

    The function is resolved in the parent first, so a bad name fails here with its ValueError. An exception out of
    `score` (a bad sample, Ctrl-C) closes the pool, because its workers may still hold calls of that batch.
    """

    def __init__(self, config: RewardConfig) -> None:
        resolve_reward(config.function)
        self.config = config
        self._workers = [_Worker(config) for _ in range(config.num_workers)]
        self._closed = False

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Kill every worker (idempotent)."""
        if not self._closed:
            self._closed = True
            for worker in self._workers:
                worker.kill()

    def score(self, samples: Sequence[tuple[str, str, Mapping]]) -> tuple[list[float], RewardStats]:
        """Rewards of `(completion, answer, extra)` samples, in input order, and the batch's `RewardStats`.

        The call for sample i is `fn(completion, answer, **config.function_kwargs, **extra)`.
        """
        if self._closed:
            raise RuntimeError("the reward pool is closed")
        tasks = [_check_sample(i, sample, self.config.function_kwargs) for i, sample in enumerate(samples)]
        try:
            results = self._run(tasks)
        except BaseException:
            self.close()
            raise
        failure_reward = float(self.config.failure_reward)
        rewards = [value if outcome == "ok" else failure_reward for outcome, value in results]
        return rewards, RewardStats.of(results)

    def _run(self, tasks: list[tuple[str, str, dict]]) -> list[tuple[str, float | str]]:
        """(outcome, reward or error message) per task, in task order."""
        results: list = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        remaining = len(tasks)
        for slot, worker in enumerate(self._workers):
            if not worker.process.is_alive():  # died between batches (killed, out of memory): nothing of it is lost
                self._replace(slot)
        while remaining:
            for slot in range(len(self._workers)):
                worker = self._workers[slot]
                while worker.ready and pending and (not worker.sent or worker.sent_bytes + _size(tasks[pending[0]])
                                                    <= IN_FLIGHT_BYTES):
                    index = pending.popleft()
                    if not worker.sent:
                        worker.deadline = time.monotonic() + self.config.timeout_s
                    worker.sent.append(index)
                    worker.sent_bytes += _size(tasks[index])
                    try:
                        worker.conn.send((index, *tasks[index]))
                    except OSError:  # it died before reading any of them: they go to the others, none ran
                        pending.extendleft(reversed(worker.sent))
                        worker.sent.clear()
                        self._replace(slot)
                        break
            next_deadline = min(w.deadline if w.ready else w.startup_deadline for w in self._workers)
            timeout = None if next_deadline == math.inf else max(0.0, next_deadline - time.monotonic())
            readable = wait([w.conn for w in self._workers], timeout=timeout)
            for slot, worker in enumerate(self._workers):
                if worker.conn in readable:
                    remaining -= self._receive(slot, worker, results, tasks, pending)
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if not worker.ready and now > worker.startup_deadline:
                    raise RuntimeError(f"a reward worker did not start within {STARTUP_TIMEOUT_S:g} s")
                if worker.sent and now > worker.deadline:
                    results[worker.sent[0]] = ("timed_out", f"timed out after {self.config.timeout_s:g} s")
                    self._replace(slot, pending)
                    remaining -= 1
        return results

    def _receive(self, slot: int, worker: _Worker, results: list, tasks: list, pending: deque) -> int:
        """Handle the messages (or the death) of a worker; returns how many samples it finished."""
        finished = 0
        while True:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                worker.process.join()
                if not worker.ready:
                    raise RuntimeError(f"a reward worker exited during start-up (exit code "
                                       f"{worker.process.exitcode})") from None
                if worker.sent:
                    results[worker.sent[0]] = ("crashed", f"worker died (exit code {worker.process.exitcode})")
                    finished += 1
                self._replace(slot, pending)
                return finished
            if message[0] == "ready":
                worker.ready = True
            elif message[0] == "init_failed":
                raise RuntimeError(f"a reward worker could not load {self.config.function!r}: {message[1]}")
            else:
                index, outcome, payload = message
                results[index] = (outcome, payload)
                worker.sent.popleft()
                worker.sent_bytes -= _size(tasks[index])
                worker.deadline = time.monotonic() + self.config.timeout_s if worker.sent else math.inf
                finished += 1
            if not worker.conn.poll():
                return finished

    def _replace(self, slot: int, pending: deque | None = None) -> None:
        """A new worker in `slot`; the samples the old one had queued behind its first go back to `pending`."""
        worker = self._workers[slot]
        if pending is not None:
            pending.extendleft(reversed(list(worker.sent)[1:]))
        worker.kill()
        self._workers[slot] = _Worker(self.config)


def _size(task: tuple[str, str, dict]) -> int:
    """About the pickled size of a task (its texts; `extra` is usually small)."""
    completion, answer, extra = task
    return len(completion) + len(answer) + 64 * len(extra) + 64
