"""Rank liveness: a rank that is killed, stopped (SIGSTOP) or lost with its node ends the job instead of hanging it.

Without this check, the other ranks wait for the lost rank in their next collective until the backend's timeout
(30 min by default) or forever. Each rank runs two daemon threads beside its training:

- the beater uses the process group's rendezvous store (the default TCPStore, kept by rank 0 or by torchrun's
  agent) through a connection of its own (`Store.clone()`). Every `interval` seconds it adds 1 to this rank's
  counter and reads every rank's counter in one `multi_get`;
- the judge checks, every `interval` seconds, what the beater heard. It uses only this rank's monotonic clock, so
  no clocks are compared across hosts. Another rank is lost when its counter has not moved for `timeout` seconds.
  The store is lost when no round trip to it has finished for `timeout` seconds: its host was killed, or it was
  stopped. A call to a stopped TCPStore never returns, which is why the judge is a thread of its own. A rank
  that has not written its first beat yet is lost only `timeout` seconds after this watchdog started.

A lost rank or store makes the judge write one line to stderr. The line names the lost ranks with the host and pid
each one registered. The judge then ends the process with os._exit(EXIT_CODE), without atexit handlers or
`finally` blocks. The main thread may be inside a C++ collective that never returns, so nothing gentler would end
the process. torchrun then stops the other workers, and under Slurm `srun --kill-on-bad-exit=1` ends the step.

What counts as alive: collectives, sleeps and I/O release the GIL, so a rank that is blocked in a collective keeps
beating. Only a process that is dead or stopped goes silent. Two limitations: a rank stuck in Python forever while
it holds the GIL goes silent too, so it is reported as lost (as is a rank whose single C call keeps the GIL for
longer than `timeout`). A rank stuck forever in a call that has released the GIL, for example a collective that
has a mismatched partner, keeps beating, and this watchdog cannot see that hang (NCCL's own timeout covers it:
TORCH_NCCL_ASYNC_ERROR_HANDLING).

The end of a run: `stop(done=True)` adds DONE to this rank's counter, and from then on the others no longer wait
for it. The rank can then leave while the others are still closing. A rank that fails stops with done=False. It
goes silent, so the others end `timeout` seconds later if the launcher has not ended them first. If the store's
host leaves first (rank 0 under srun), the others have `timeout` seconds to stop their own watchdogs.

Cost: two threads that mostly sleep. Each interval, each rank makes 2 round trips to the store (an add, and a
multi_get of world_size counters of a few bytes each). The store's host therefore answers 2 x world_size requests
per interval: 0.4 per rank per second at the usual 5 s interval. At start, each rank makes world_size round trips
(it creates every counter, so that multi_get never waits for a key). Measured on one CPU machine against a TCPStore
in another process, one round took 0.08 ms with 2 counters, 0.2 ms with 64 and 1.9 ms with 1024. The store's own
CPU time was 0.05 ms and 0.4 ms per round with 64 and 1024 counters. At 1024 ranks that is about 0.4 s of store
CPU in each 5 s interval.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import torch.distributed as dist

EXIT_CODE = 75  # the exit status of a rank that lost another rank or the store (sysexits' EX_TEMPFAIL: retry later)
DONE = 1 << 40  # added to a rank's counter when it finishes normally: "do not wait for me"
_PREFIX = "megatron_sapo/watchdog"


def _describe(store) -> str:
    """Where the store lives, e.g. "TCPStore 10.0.0.1:29500", through the prefixes that the launchers add."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if isinstance(store, dist.TCPStore):
        return f"TCPStore {store.host}:{store.port}"
    return type(store).__name__


class RankWatchdog:
    """Watches the other ranks of the default process group from this rank (see the module docstring); does
    nothing with a world of one or with timeout_s = 0. Created on every rank after the process group is up; one
    watchdog per process group. The interval defaults to min(5, timeout / 4) seconds."""

    def __init__(self, timeout_s: float, interval_s: float | None = None):
        self.timeout = timeout_s
        self.interval = interval_s if interval_s is not None else min(5.0, timeout_s / 4)
        self._stopping = threading.Event()
        self._done = False
        self._threads: list[threading.Thread] = []
        if timeout_s <= 0 or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        self.rank, world = dist.get_rank(), dist.get_world_size()
        default = dist.distributed_c10d._get_default_store()
        self.where = _describe(default)
        # a connection of its own: a call that hangs here holds up no other user of the store
        self._store = default.clone()
        self._keys = [f"{_PREFIX}/beat/{r}" for r in range(world)]
        self._store.set(f"{_PREFIX}/who/{self.rank}", f"host {socket.gethostname()}, pid {os.getpid()}")
        for key in self._keys:  # every counter exists, so multi_get never waits for a rank that is not up yet
            self._store.add(key, 0)
        started = time.monotonic()
        self._heard = {r: (0, started) for r in range(world) if r != self.rank}  # last count, when it was seen
        self._who: dict[int, str] = {}
        self._last_round = started  # when the store last answered a whole round
        self._error = "no answer"
        for target, name in ((self._beat, "rank-watchdog-beat"), (self._judge, "rank-watchdog-judge")):
            self._threads.append(threading.Thread(target=target, name=name, daemon=True))
            self._threads[-1].start()

    def stop(self, done: bool = True) -> None:
        """End both threads. done=True marks this rank as finished, so the others stop waiting for it; with
        done=False the others report this rank when its silence reaches their timeout. Waits at most one interval
        for the last write (the store may be gone already). Calling it again does nothing."""
        if not self._threads or self._stopping.is_set():
            return
        self._done = done
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=self.interval)

    def _beat(self) -> None:
        own = self._keys[self.rank]
        while not self._stopping.is_set():
            try:
                self._store.add(own, 1)
                counts = [int(value) for value in self._store.multi_get(self._keys)]
                for rank in self._heard:  # "who" is written before a rank's first beat
                    if counts[rank] and rank not in self._who:
                        self._who[rank] = self._store.get(f"{_PREFIX}/who/{rank}").decode()
            except Exception as err:  # the store's host is gone: the judge reports it after `timeout`
                self._error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            else:
                now = time.monotonic()
                for rank, (count, _) in self._heard.items():
                    if counts[rank] != count:
                        self._heard[rank] = (counts[rank], now)
                self._last_round = now
            self._stopping.wait(self.interval)
        if self._done:
            try:
                self._store.add(own, DONE)
            except Exception:  # the store has gone with the end of the job: nobody is left to tell
                pass

    def _judge(self) -> None:
        while not self._stopping.wait(self.interval):
            lost = self._lost()
            if lost and not self._stopping.is_set():  # a stop meanwhile: the run is ending normally
                message = (f"megatron-sapo rank {self.rank}: {lost}; exiting with status {EXIT_CODE} so that the job "
                           "ends instead of hanging (torchrun then stops the other workers, srun "
                           "--kill-on-bad-exit=1 the step)\n")
                try:  # straight to fd 2, unbuffered: the main thread may hold sys.stderr's lock forever
                    os.write(2, message.encode())
                finally:
                    os._exit(EXIT_CODE)

    def _lost(self) -> str | None:
        """What is lost, in words, or None."""
        silence = time.monotonic() - self._last_round
        if silence > self.timeout:
            return (f"the rendezvous store ({self.where}) has not answered for {silence:.0f} s ({self._error}): the "
                    "process that keeps it (rank 0, or torchrun's agent) was killed, stopped or lost with its node")
        # as of the store's last answer
        lost = {rank: self._last_round - since for rank, (count, since) in list(self._heard.items())
                if count < DONE and self._last_round - since > self.timeout}
        if not lost:
            return None
        names = ", ".join(f"rank {rank} ({self._who.get(rank, 'never heard from')})" for rank in lost)
        return f"{names} not heard from for {max(lost.values()):.0f} s: killed, stopped or lost with its node"
