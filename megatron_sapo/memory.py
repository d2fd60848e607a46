"""The peak memory a piece of work adds to this process, measured (Linux /proc/self/status, polled every 0.5 ms on a
thread), for the memory bounds that the weight-moving paths state in their docstrings: the tests check them with it
and tools/bench_weights.py reports it.

  anon   RssAnon: private memory (tensors, buffers). The measure of what a path holds.
  rss    VmRSS: anon plus the file pages mapped in (safetensors maps its files: shared page cache, reclaimable).

glibc keeps freed blocks in the process (fragmented heaps, per-thread arenas), which then show as growth that nobody
holds: run with MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_ARENA_MAX=1 (set before the process starts) to see what the
code holds rather than what the allocator kept.
"""

from __future__ import annotations

import threading
import time


def status_bytes() -> dict[str, int]:
    """RssAnon and VmRSS of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                values["anon" if key == "RssAnon" else "rss"] = int(rest.split()[0]) * 1024
    return values


class PeakMemory:
    """Context manager: .anon and .rss are the peaks above their values at entry, in bytes."""

    def __enter__(self) -> PeakMemory:
        self._base, self.anon, self.rss = status_bytes(), 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        now = status_bytes()
        self.anon = max(self.anon, now["anon"] - self._base["anon"])
        self.rss = max(self.rss, now["rss"] - self._base["rss"])

    def _poll(self) -> None:
        while not self._done.is_set():
            self._sample()
            time.sleep(0.0005)

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()
        self._sample()
