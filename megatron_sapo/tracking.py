"""MLflow tracking for the trainer: one MLflow run per training job, written from rank 0. The only module that imports
MLflow (lazily, so importing this one is cheap).

An unreachable tracking server never stops training. Every Tracker call only appends a record to an in-memory queue
and returns; one background thread sends the records in order (the run's creation first, then params, metrics,
artifacts, the final status). While the server does not answer, the record at the head of the queue stays there and
is re-sent every `retry_interval_s`; one warning says the server is gone and one that it is back. A request the
server rejects (an invalid name, a changed param value) is dropped with a warning instead, so that one bad record
never holds up the rest. What is still unsent at `close()` goes to <output_dir>/mlflow/pending.jsonl, and the next
Tracker of that output_dir sends it before anything new (at least once: a crash while replaying may repeat some).
Metrics that have a record of their own (the trainer's metrics.jsonl) are the exception: they are logged with a
`mark` (their line in that record), the mark of the last one sent is kept in <output_dir>/mlflow/metrics_sent, and
the ones not sent are left to their owner to log again (loop/recorder.py fills MLflow in from metrics.jsonl), so
they are not kept twice and a crash loses none of them.

Without a tracking URI (neither `tracking.tracking_uri` nor $MLFLOW_TRACKING_URI) the run lives in an embedded store
inside the output dir: sqlite:///<output_dir>/mlflow/mlflow.db, artifacts under <output_dir>/mlflow/artifacts, which
`mlflow ui --backend-store-uri sqlite:///...` opens later. Any sqlite store (a sweep's cells share one) keeps its
experiments' artifacts in the `artifacts` folder beside the database file, and is created by whichever job comes
first, under a file lock. The trainer needs only MLflow's client (mlflow-skinny, plus
sqlalchemy and alembic for the sqlite store); a tracking server is a separate process with the full `mlflow` package.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .atomic import write_atomic

logger = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation), repeated here so that this module imports without MLflow
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow names may hold alphanumerics, "_", "-", ".", " " and "/" (":" too, except on a Windows server)
_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")


@dataclass(frozen=True)
class TrackingConfig:
    """The `tracking.*` keys of the trainer's YAML."""

    enabled: bool = True  # False: every Tracker call does nothing
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI when set, else the embedded sqlite store
    experiment: str = "megatron_sapo"
    run_name: str | None = None  # None: the output dir's folder name
    tags: dict[str, str] = field(default_factory=dict)  # set on the run when it is created (a sweep tags its cells)
    retry_interval_s: float = 5.0  # how often buffered records are re-sent while the server is unreachable
    request_timeout_s: float = 10.0  # per HTTP request to a tracking server

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"tracking.enabled must be true or false, got {self.enabled!r}")
        for name in ("retry_interval_s", "request_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"tracking.{name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise ValueError(f"tracking.experiment must be a non-empty name, got {self.experiment!r}")
        if not isinstance(self.tags, dict) or not all(isinstance(k, str) and k for k in self.tags):
            raise ValueError(f"tracking.tags must be a mapping of names to values, got {self.tags!r}")
        for name in ("tracking_uri", "run_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"tracking.{name} must be a non-empty string or null (the default), got {value!r}")


def resolve_tracking_uri(cfg: TrackingConfig, output_dir: str | Path) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else the embedded sqlite store of `output_dir`."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return _embedded_uri(Path(output_dir))


def _embedded_uri(output_dir: Path) -> str:
    return "sqlite:///" + str((output_dir / "mlflow" / "mlflow.db").resolve())


def sanitize_key(key: str) -> str:
    """A metric or param name MLflow accepts: other characters become "_", and the name must stay itself as a path
    (no empty, "." or ".." parts, no leading "/" or ".."), at most 250 characters."""
    name = _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY_LENGTH]
    name = "/".join("__" if part == ".." else part for part in name.split("/") if part not in ("", "."))
    if name.startswith("."):
        name = "_" + name[1:]
    return name or "_"


def find_run_id(output_dir: str | Path) -> str | None:
    """The MLflow run of an output dir: the id its Tracker wrote to <output_dir>/mlflow/run_id, None before that."""
    path = Path(output_dir) / "mlflow" / "run_id"
    run_id = path.read_text().strip() if path.is_file() else ""
    return run_id or None


def sqlite_store_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def create_sqlite_store(path: Path) -> None:
    """Create a sqlite store (artifacts in the folder beside it) in a file of its own, then move it into place.
    MLflow builds its tables in a series of migrations: one interrupted (a crash, another process holding the file
    locked past sqlite's busy timeout) would leave a half-migrated store that MLflow can never open again (found by
    tests/test_faults.py: "duplicate column name" at every later open), and the run's tracking lost with it. Jobs
    that start together on one store (a sweep's Slurm array) take a lock file first, so only one creates it."""
    if path.exists():
        return
    import fcntl

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        store = SqlAlchemyStore("sqlite:///" + str(tmp), (path.parent / "artifacts").resolve().as_uri())
        store.engine.dispose()
        os.replace(tmp, path)


def _is_transient(error: Exception) -> bool:
    """A failure worth retrying (no answer, a timeout, a 5xx or 429 answer), as opposed to a request the tracking
    store rejected (4xx: invalid name, changed param, unknown run) or a local file that is gone."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):  # MLflow wraps connection errors and timeouts as INTERNAL_ERROR (500)
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(error, OSError) and not isinstance(error, FileNotFoundError)


def _describe(record: dict) -> str:
    if record["op"] == "metrics":
        return f"the metrics of step {record['step']}"
    if record["op"] == "artifact":
        return f"artifact {record['path']}"
    return {"start_run": "the run's start", "params": "params", "end_run": "the run's end status"}[record["op"]]


class Tracker:
    """One MLflow run of a training job, written from rank 0 only.

    `run_id` given: that run continues (its status goes back to RUNNING; a run the store cannot continue, unknown or
    deleted, is replaced by a new one, with a warning). Otherwise a new run is created in `cfg.experiment`; the
    exception is an output dir whose previous Tracker never reached the server: that job's run, created from
    pending.jsonl, continues.
    `run_id` stays None until the run exists, i.e. while the server has been unreachable since the start.

    No call blocks on the server or raises because of it; `close()` (also registered with atexit, with status
    FAILED, for a job that ends without closing) sends what it can within its timeout and keeps the rest on disk.
    Process-wide side effect: MLflow's own HTTP retries are turned off (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0) and its
    request timeout set from `cfg.request_timeout_s`, unless those variables are already set.
    """

    def __init__(self, cfg: TrackingConfig, output_dir: str | Path, *, run_id: str | None = None):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "mlflow"
        self.tracking_uri = resolve_tracking_uri(cfg, self.output_dir)
        self._sqlite = sqlite_store_path(self.tracking_uri)  # the embedded store, or another sqlite file
        self.run_id = run_id
        self._closed = False
        self._renamed: set[str] = set()  # names already warned about
        if not cfg.enabled:
            return
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise ImportError("tracking needs MLflow's client: pip install mlflow-skinny sqlalchemy alembic "
                              "(or set tracking.enabled: false)") from error
        self._client_class = MlflowClient
        # MLflow's REST client would retry a failed request 7 times with exponential backoff (minutes); the sender
        # thread retries on its own schedule instead. Read by MLflow at every request.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(math.ceil(cfg.request_timeout_s)))
        self.root.mkdir(parents=True, exist_ok=True)
        self._pending_path = self.root / "pending.jsonl"
        self._queue = deque(self._load_pending())
        self._pending_left = len(self._queue)  # replayed records still in the queue; pending.jsonl goes at 0
        continue_previous = run_id is None and any(r["op"] == "start_run" and r["run_id"] is None for r in self._queue)
        self._start = self._start_record(run_id, continue_previous)
        self._queue.append(self._start)
        self._cond = threading.Condition()
        self._stopping = False
        self._unreachable = False
        self._failures = 0  # connection failures so far; close() stops waiting at the next one
        self._client = None
        self._current: str | None = None  # the run the sender is writing to
        self._known_params: dict[str, str] = {}  # the current run's params, to skip the ones already there
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-tracker", daemon=True)
        self._thread.start()
        atexit.register(self.close, "FAILED")

    # -- the training side: each call queues one record and returns ------------------------------------------------

    def log_params(self, params: dict[str, object]) -> None:
        """Logs a flat dict (the caller flattens nested config); values are logged as str, cut at 6000 characters."""
        clean = {}
        for key, value in params.items():
            text = str(value)
            if len(text) > MAX_PARAM_VALUE_LENGTH:
                logger.warning("param %r is %d characters long; MLflow keeps the first %d", key, len(text),
                               MAX_PARAM_VALUE_LENGTH)
                text = text[:MAX_PARAM_VALUE_LENGTH]
            clean[self._key(key)] = text
        self._put({"op": "params", "params": [[k, v] for k, v in clean.items()]})

    def log_metrics(self, metrics: dict[str, float], step: int, *, timestamp: float | None = None,
                    mark: int | None = None) -> None:
        """Logs one step's metrics, sent in one request, time-stamped `timestamp` (Unix seconds; default now, so a
        buffered step keeps its true time). NaN is logged as NaN; MLflow stores +-inf as +-1.8e308. With `mark` (the
        caller's own record of these metrics, e.g. a line number), the record is not kept in pending.jsonl and, once
        sent, `sent_mark()` returns that mark."""
        when = time.time() if timestamp is None else timestamp
        self._put({"op": "metrics", "step": int(step), "timestamp": int(when * 1000), "mark": mark,
                   "metrics": [[self._key(k), float(v)] for k, v in metrics.items()]})

    def sent_mark(self) -> int | None:
        """The mark of the last marked metrics sent (or set by `set_mark`), None when there is none."""
        path = self.root / "metrics_sent"
        text = path.read_text().strip() if path.is_file() else ""
        return int(text) if text else None

    def set_mark(self, mark: int) -> None:
        """Record `mark` as sent (a caller starting a new run after older marked records)."""
        write_atomic(self.root / "metrics_sent", f"{mark}\n")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads a file (or a folder's files) under `artifact_path` of the run's artifacts. The file is read when it
        is sent, so it must stay in place until then."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"no artifact to log at {path}")
        self._put({"op": "artifact", "path": str(path), "artifact_path": artifact_path, "outbox": None})

    def log_text(self, text: str, artifact_file: str) -> None:
        """Logs `text` as the artifact `artifact_file` (a relative path such as "samples/step_10.txt"). It is written
        first to a file under <output_dir>/mlflow/outbox, which survives an outage and is removed once sent."""
        name = PurePosixPath(artifact_file)
        if name.is_absolute() or ".." in name.parts or not name.name:
            raise ValueError(f"artifact_file must be a relative file path inside the run's artifacts, got "
                             f"{artifact_file!r}")
        if not self.cfg.enabled:
            return
        self._check_open(f"artifact {artifact_file}")
        outbox = self.root / "outbox" / uuid.uuid4().hex  # one folder per call: a later text of the same name waits
        local = outbox / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)
        parent = str(name.parent)
        self._put({"op": "artifact", "path": str(local), "artifact_path": None if parent == "." else parent,
                   "outbox": str(outbox)})

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until everything queued has been sent (or dropped as rejected, with a warning). True when so, False
        when `timeout` seconds passed first or the tracker was closed with records left (they are in pending.jsonl)."""
        if not self.cfg.enabled:
            return True
        with self._cond:
            self._cond.wait_for(lambda: not self._queue or self._stopping, timeout)
            return not self._queue

    def close(self, status: str = "FINISHED", *, timeout: float = 30.0) -> None:
        """Sends what is queued and sets the run's status, waiting at most `timeout` seconds, and no longer than the
        next failed attempt while the server is unreachable. What is still unsent is written to pending.jsonl for
        the next Tracker of this output dir. Closing twice does nothing."""
        if status not in END_STATUSES:
            raise ValueError(f"run status must be one of {END_STATUSES}, got {status!r}")
        if self._closed or not self.cfg.enabled:
            self._closed = True
            return
        self._put({"op": "end_run", "status": status})
        self._closed = True
        atexit.unregister(self.close)
        with self._cond:
            failures = self._failures
            self._cond.wait_for(lambda: not self._queue or self._failures > failures, timeout)
            self._stopping = True
            self._cond.notify_all()
        # the sender finishes the request in flight (bounded by the request timeout, as MLflow does not retry)
        self._thread.join(timeout=2 * self.cfg.request_timeout_s + 5)
        if self._thread.is_alive() and self._queue:
            logger.warning("MLflow sender still busy after close; %s may be sent twice", _describe(self._queue[0]))
        self._save_pending()

    def state_dict(self) -> dict:
        """What the trainer's checkpoint keeps to continue this run after a restart."""
        return {"run_id": self.run_id}

    def _key(self, key: str) -> str:
        name = sanitize_key(key)
        if name != key and key not in self._renamed:
            self._renamed.add(key)
            logger.warning("MLflow does not accept the name %r; logging it as %r", key, name)
        return name

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"the tracker of {self.output_dir} is closed; cannot log {what}")

    def _put(self, record: dict) -> None:
        if not self.cfg.enabled:
            return
        self._check_open(_describe(record))
        with self._cond:
            self._queue.append(record)
            self._cond.notify_all()

    def _start_record(self, run_id: str | None, continue_previous: bool = False) -> dict:
        return {"op": "start_run", "run_id": run_id, "continue_previous": continue_previous,
                "experiment": self.cfg.experiment,
                "run_name": self.cfg.run_name or self.output_dir.resolve().name,
                "artifact_location": (self._sqlite.parent / "artifacts").resolve().as_uri() if self._sqlite else None,
                "tags": {"output_dir": str(self.output_dir.resolve()), **self.cfg.tags}}

    # -- pending.jsonl: what a closed Tracker could not send ---------------------------------------------------------

    def _load_pending(self) -> list[dict]:
        if not self._pending_path.exists():
            return []
        records = []
        for number, line in enumerate(self._pending_path.read_text().splitlines(), 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d is not a JSON record; skipped", self._pending_path, number)
        logger.info("sending %d records that %s kept from the previous run", len(records), self._pending_path)
        return records

    def _save_pending(self) -> None:
        with self._cond:
            records = list(self._queue)
            self._pending_left = 0  # a sender still busy after close must not remove the file written here
        records = [r for r in records if r["op"] != "metrics" or r.get("mark") is None]  # their owner re-logs them
        if not records:
            return
        if records[0]["op"] != "start_run":  # the run these records belong to
            records.insert(0, self._start_record(self._current))
        write_atomic(self._pending_path, "".join(json.dumps(r) + "\n" for r in records))
        logger.warning("%d records not sent to MLflow tracking at %s by close are kept in %s, for the next Tracker "
                       "of %s", len(records), self.tracking_uri, self._pending_path, self.output_dir)

    # -- the sender thread -------------------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                record = self._queue[0]
            try:
                self._send(record)
            except Exception as error:  # noqa: BLE001 - whatever fails, training goes on
                if _is_transient(error):
                    self._on_failure(error)
                    with self._cond:
                        self._cond.wait_for(lambda: self._stopping, self.cfg.retry_interval_s)
                    continue
                logger.warning("MLflow tracking at %s rejected %s; dropped: %s", self.tracking_uri,
                               _describe(record), error)
            self._on_success()

    def _on_failure(self, error: Exception) -> None:
        with self._cond:
            self._failures += 1
            first = not self._unreachable
            self._unreachable = True
            self._cond.notify_all()
        if first:
            logger.warning("MLflow tracking at %s is unreachable (%s); training goes on, records are kept and re-sent "
                           "every %g s", self.tracking_uri, str(error)[:300], self.cfg.retry_interval_s)

    def _on_success(self) -> None:
        with self._cond:
            self._queue.popleft()
            back, self._unreachable = self._unreachable, False
            left = len(self._queue)
            if self._pending_left:
                self._pending_left -= 1
                if not self._pending_left:
                    self._pending_path.unlink(missing_ok=True)
            self._cond.notify_all()
        if back:
            logger.warning("MLflow tracking at %s is reachable again; sending %d kept records", self.tracking_uri,
                           left + 1)

    def _send(self, record: dict) -> None:
        """Sends one record. A record sent in several requests (chunks, artifacts) drops each part once sent, so
        a retry after a failure sends only the rest."""
        from mlflow.entities import Metric

        if self._client is None:
            if self._sqlite:
                create_sqlite_store(self._sqlite)
            self._client = self._client_class(self.tracking_uri)
        client, op = self._client, record["op"]
        if op == "start_run":
            self._current = self._start_run(record)
            if self._current is not None:
                write_atomic(self.root / "run_id", self._current + "\n")
            if record is self._start:
                self.run_id = self._current
        elif self._current is None:
            return  # the run could not be started (warned): nothing to write to
        elif op == "params":
            self._send_params(record["params"])
        elif op == "metrics":
            metrics = record["metrics"]
            while metrics:
                client.log_batch(self._current, metrics=[Metric(key, value, record["timestamp"], record["step"])
                                                         for key, value in metrics[:MAX_METRICS_PER_BATCH]])
                del metrics[:MAX_METRICS_PER_BATCH]
            if record.get("mark") is not None:
                self.set_mark(record["mark"])
        elif op == "artifact":
            if Path(record["path"]).is_dir():
                client.log_artifacts(self._current, record["path"], record["artifact_path"])
            else:
                client.log_artifact(self._current, record["path"], record["artifact_path"])
            if record["outbox"]:
                shutil.rmtree(record["outbox"], ignore_errors=True)
        elif op == "end_run":
            client.set_terminated(self._current, record["status"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")

    def _send_params(self, params: list[list[str]]) -> None:
        from mlflow.entities import Param

        fresh = []
        for key, value in params:
            if key not in self._known_params:
                fresh.append([key, value])
            elif self._known_params[key] != value:
                logger.warning("param %r of run %s is %r; MLflow cannot change it to %r, kept", key, self._current,
                               self._known_params[key], value)
        params[:] = fresh
        while params:
            chunk = params[:MAX_PARAMS_PER_BATCH]
            self._client.log_batch(self._current, params=[Param(key, value) for key, value in chunk])
            self._known_params.update(chunk)
            del params[:MAX_PARAMS_PER_BATCH]

    def _start_run(self, record: dict) -> str | None:
        """Continues the record's run (or the previous job's run) or creates one; None when the store refuses."""
        client = self._client
        run_id = record["run_id"] or (self._current if record["continue_previous"] else None)
        try:
            if run_id is not None:
                try:
                    client.update_run(run_id, status="RUNNING")
                    self._known_params = dict(client.get_run(run_id).data.params)
                    return run_id
                except Exception as error:  # noqa: BLE001
                    if _is_transient(error):
                        raise
                    logger.warning("MLflow tracking at %s cannot continue run %s (%s); starting a new run",
                                   self.tracking_uri, run_id, error)
            experiment_id = self._experiment_id(record["experiment"], record["artifact_location"])
            run = client.create_run(experiment_id, run_name=record["run_name"], tags=record["tags"])
            self._known_params = {}
            return run.info.run_id
        except Exception as error:  # noqa: BLE001
            if _is_transient(error):
                raise
            logger.warning("MLflow tracking at %s refused to start the run (%s); its records are dropped",
                           self.tracking_uri, error)
            return None

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self._client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            experiment = self._client.get_experiment_by_name(name)  # another job may have created it meanwhile
            if experiment is None:
                raise
            return experiment.experiment_id
