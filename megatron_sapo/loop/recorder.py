"""The run recorder (rank 0): what a run leaves for its user to read.

- metrics.jsonl in the output dir is the record: one JSON line per logged step ({"step", "wall_time", metrics...}),
  appended and flushed before anything else sees the metrics. A step logged again after a resume appends a new line;
  readers keep a step's last line (`read_history`, the one history reader: summaries, plots, `megatron-sapo plot`).
- MLflow gets a copy through the tracker (tracking.py), which never blocks training. Each copy is marked with its
  line, and the tracker keeps the mark of the last line it sent; a resumed run first re-sends the lines MLflow
  missed (the server was down at the end of the last job, or the job crashed with records still queued), so the
  MLflow run ends up with every step once, at the step's own time.
- the resolved config (config.yaml, also printed and logged as params), eval samples as artifacts, and at the end a
  summary of the reward and pass@1 and the training curves (plots/training_curves.png, logged to MLflow).
Other ranks get `NoRecorder`, which records nothing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from ..atomic import describe_os_error
from ..config import dump_yaml, flatten, save_config, to_dict
from ..tracking import Tracker, find_run_id

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
NOT_METRICS = ("step", "wall_time")


class MetricsWriteError(RuntimeError):
    pass


def read_rows(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl; a line cut short by a crash is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: skipped a line that is not JSON (cut short by a crash?): %.80s", path, line)
    return rows


def read_history(out: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric's (step, value) series of the run in `out`, from its metrics.jsonl; a step logged more than once
    (redone after a resume) keeps its last value."""
    by_step: dict[str, dict[int, float]] = {}
    for row in read_rows(Path(out) / METRICS_FILE):
        for key, value in row.items():
            if key not in NOT_METRICS and isinstance(value, (int, float)) and math.isfinite(value):
                by_step.setdefault(key, {})[row["step"]] = float(value)
    return {key: sorted(values.items()) for key, values in by_step.items()}


class NoRecorder:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_samples(self, step: int, rows: list[dict]) -> None:
        pass

    def state(self) -> None:
        return None

    def close(self, status: str) -> None:
        pass


class RunRecorder:
    def __init__(self, cfg, out: Path, resumed, *, say=lambda text: None):
        self.cfg, self.out, self.say = cfg, Path(out), say
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / METRICS_FILE
        save_config(cfg, self.out / "config.yaml")
        print(dump_yaml(cfg), end="", flush=True)
        self._drop_cut_line()
        rows = read_rows(self.path)
        self._lines = len(rows)
        self.tracker = None
        if cfg.tracking.enabled:
            # a resumed run continues its MLflow run, also one created after its checkpoint was written
            run_id = resumed.state.get("mlflow_run_id") or (find_run_id(self.out) if resumed.path else None)
            self.tracker = Tracker(cfg.tracking, self.out, run_id=run_id)
            self.tracker.log_params(flatten(to_dict(cfg)))
            self.tracker.log_artifact(self.out / "config.yaml")
            self._fill_in(resumed, rows)

    def _drop_cut_line(self) -> None:
        """A line the last job did not finish writing (it crashed) goes, so that new lines start on their own."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            log.warning("%s: dropped its last line, cut short by a crash: %.80s", self.path,
                        data[data.rfind(b"\n") + 1:].decode(errors="replace"))
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def _fill_in(self, resumed, rows: list[dict]) -> None:
        """Send MLflow the lines of metrics.jsonl (`rows`) it missed, up to the resumed step (later ones are redone);
        a new run (nothing resumed) starts after the lines of earlier runs in this output dir."""
        if resumed.path is None:
            self.tracker.set_mark(self._lines)
            return
        sent = self.tracker.sent_mark() or 0
        missed = [(number, row) for number, row in enumerate(rows, 1)
                  if number > sent and row.get("step", math.inf) <= resumed.step]
        if missed:
            self.say(f"sending MLflow the metrics of {len(missed)} logged steps it has not received")
        for number, row in missed:
            self.tracker.log_metrics({k: v for k, v in row.items() if k not in NOT_METRICS}, row["step"],
                                     timestamp=row.get("wall_time"), mark=number)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append the step's row to metrics.jsonl, then send it to MLflow. A row that cannot be written (a full
        disk) is a MetricsWriteError naming the file, the OS error and the space left: metrics.jsonl is the run's
        record, so the run stops rather than go on unrecorded (a cut line is dropped at the next start)."""
        row = {"step": step, "wall_time": time.time(), **metrics}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as err:
            import shutil

            free = shutil.disk_usage(self.path.parent).free
            raise MetricsWriteError(f"cannot write step {step}'s metrics: {describe_os_error(err, self.path)} "
                                    f"({free} bytes free there); free space and run the same command again: it "
                                    "resumes from the newest checkpoint") from err
        self._lines += 1
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step, timestamp=row["wall_time"], mark=self._lines)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        if self.tracker is not None and rows and self.cfg.trainer.log_samples:
            self.tracker.log_text(json.dumps(rows[:self.cfg.trainer.log_samples], indent=1),
                                  f"samples/step_{step:08d}.json")

    def state(self) -> dict:
        return {"mlflow_run_id": self.tracker.run_id if self.tracker else None}

    def close(self, status: str) -> None:
        """The summary and the curves when the run finished; the MLflow run's end status."""
        if status == "FINISHED" and self.path.is_file():
            history = read_history(self.out)
            self._summary(history)
            if self.tracker is not None:
                self._log_plots(history)
        if self.tracker is not None:
            self.tracker.close(status)
            self.tracker = None

    def _summary(self, history) -> None:
        rewards = [v for _, v in history.get("reward/mean", [])]
        if len(rewards) >= 2:
            k = min(5, len(rewards) // 2)
            first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
            self.say(f"reward/mean: first {k} steps {first:.3f}, last {k} steps {last:.3f} ({last - first:+.3f})")
        passes = history.get("eval/pass_at_1", [])
        if len(passes) >= 2:
            self.say(f"eval pass@1: step {passes[0][0]} {passes[0][1]:.3f}, step {passes[-1][0]} {passes[-1][1]:.3f}")

    def _log_plots(self, history) -> None:
        try:
            from ..plots import plot_history

            paths = plot_history(history, self.out / "plots")
        except (ImportError, ValueError) as err:
            log.warning("no training plots: %s", err)
            return
        for path in paths:
            self.tracker.log_artifact(path, "plots")
