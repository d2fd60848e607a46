"""The training progress line: step, a bar, the latest reward and throughput, seconds per step and the ETA.

On a terminal the line is redrawn in place; in a log file (Slurm output, CI) each step is one line, so the log
reads as a table and no carriage returns pile up.
"""

from __future__ import annotations

import sys
import time

BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    def __init__(self, total: int, start: int = 0, *, stream=None, enabled: bool = True):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.began = time.monotonic()

    def restart(self, start: int) -> None:
        """Time from now: the rate and ETA count only the steps run in this process (after a resume)."""
        self.start, self.began = start, time.monotonic()

    def update(self, step: int, fields: dict[str, str]) -> None:
        """Report that `step` (1-based count of finished steps) is done; `fields` are shown as `name value`."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.began
        done = step - self.start
        per_step = elapsed / done if done > 0 else 0.0
        filled = int(BAR_WIDTH * step / self.total) if self.total else BAR_WIDTH
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        parts = [f"step {step}/{self.total} [{bar}]", *(f"{k} {v}" for k, v in fields.items()),
                 f"{per_step:.2f} s/step", f"eta {format_duration(per_step * (self.total - step))}"]
        line = " | ".join(parts)
        if self.interactive:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (an evaluation, a checkpoint) without breaking the progress line."""
        if not self.enabled:
            return
        self.stream.write(("\r\033[K" if self.interactive else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.interactive:
            self.stream.write("\n")
            self.stream.flush()
