"""MLflow tracking against real stores: the embedded sqlite store of an output dir, and a real `mlflow server`
(its own environment, $SAPO_MLFLOW_PYTHON or .venv-mlflow) that is killed and restarted while a Tracker logs:
training calls stay fast, nothing is lost, nothing is sent twice, and a closed Tracker's unsent records reach the
server through the next Tracker of the same output dir. Everything is read back with MLflow's own client."""

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from megatron_sapo.tracking import (Tracker, TrackingConfig, find_run_id, resolve_tracking_uri,
                                    sanitize_key)

REPO = Path(__file__).resolve().parents[1]
SERVER_PYTHON = os.environ.get("SAPO_MLFLOW_PYTHON", str(REPO / ".venv-mlflow" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` over a sqlite store. It runs uvicorn in a child process, so it gets its own process
    group and a kill takes both down, as a crashed machine would."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        cmd = [SERVER_PYTHON, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        # the server's job runner (for GenAI evaluation) starts several worker processes this test has no use for
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.kill()
        log_tail = (self.root / "server.log").read_text(errors="replace")[-4000:]
        pytest.fail(f"mlflow server on port {self.port} did not answer /health within {timeout} s:\n{log_tail}")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(SERVER_PYTHON).exists():
        if os.environ.get("SAPO_MLFLOW_PYTHON"):
            pytest.fail(f"MLflow server environment missing: {SERVER_PYTHON}")
        pytest.skip("MLflow server environment not installed (.venv-mlflow: pip install -r "
                    "requirements/mlflow-server.txt)")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def warned(caplog):
    caplog.set_level(logging.WARNING, logger="megatron_sapo.tracking")
    return lambda text: [r for r in caplog.records if r.name == "megatron_sapo.tracking" and text in r.getMessage()]


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every value MLflow holds for `key`, duplicates included, in logging order."""
    metrics = MlflowClient(uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(metrics, key=lambda m: (m.timestamp, m.step))]


def test_embedded_store_by_default_and_resume(tmp_path, monkeypatch, warned):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "job_7"
    tracker = Tracker(TrackingConfig(), out)
    uri = tracker.tracking_uri
    assert uri == f"sqlite:///{out.resolve()}/mlflow/mlflow.db"
    tracker.log_params({"lr": 3e-4, "model.name": "tiny", "sched(warmup)": 10})
    for step in range(3):
        tracker.log_metrics({"reward/mean": 0.25 * step, "train/lr(1e-3)": 1e-3, "train/loss": float("nan")}, step,
                            timestamp=1_700_000_000 + step, mark=step + 1)
    tracker.log_text("3142: 1234\n", "samples/step_2.txt")
    assert tracker.flush(timeout=60)
    run_id = tracker.run_id
    assert run_id and find_run_id(out) == run_id and tracker.state_dict() == {"run_id": run_id}
    tracker.close()
    assert (out / "mlflow" / "mlflow.db").is_file()
    assert len(warned("logging it as 'train/lr_1e-3_'")) == 1  # once, not once per step

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "job_7"
    assert client.get_experiment(run.info.experiment_id).name == "megatron_sapo"
    assert run.info.artifact_uri == (out / "mlflow" / "artifacts").resolve().as_uri() + f"/{run_id}/artifacts"
    assert run.data.params == {"lr": "0.0003", "model.name": "tiny", "sched_warmup_": "10"}
    assert history(uri, run_id, "reward/mean") == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert tracker.sent_mark() == 3  # the mark of the last metrics sent; each at its own time
    assert sorted(m.timestamp for m in client.get_metric_history(run_id, "reward/mean")) == [
        (1_700_000_000 + s) * 1000 for s in range(3)]
    assert history(uri, run_id, "train/lr_1e-3_") == [(0, 1e-3), (1, 1e-3), (2, 1e-3)]
    assert all(value != value for _, value in history(uri, run_id, "train/loss"))  # NaN stays NaN
    assert Path(client.download_artifacts(run_id, "samples/step_2.txt", str(tmp_path))).read_text() == "3142: 1234\n"
    assert not any((out / "mlflow" / "outbox").iterdir())  # the local copy goes once sent
    with pytest.raises(RuntimeError, match="closed"):
        tracker.log_metrics({"reward/mean": 1.0}, 3)

    # a restart continues the same run: params logged again (one changed), later steps appended
    resumed = Tracker(TrackingConfig(), out, run_id=run_id)
    resumed.log_params({"lr": 3e-4, "model.name": "other", "resumed_from": 2})
    resumed.log_metrics({"reward/mean": 0.75}, 3)
    resumed.close()
    assert resumed.run_id == run_id and find_run_id(out) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.0003", "model.name": "tiny", "sched_warmup_": "10", "resumed_from": "2"}
    assert len(warned("cannot change it to 'other'")) == 1
    assert history(uri, run_id, "reward/mean") == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75)]
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]


def test_rejected_record_is_dropped_and_later_ones_still_go(tmp_path, monkeypatch, warned):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(TrackingConfig(), tmp_path)
    tracker.log_metrics({"a": 1.0}, 0)
    tracker.log_params({"note": "x" * 7000})  # cut to MLflow's 6000 characters, accepted
    assert tracker.flush(timeout=60)
    client = MlflowClient(tracker.tracking_uri)
    assert client.get_run(tracker.run_id).data.params == {"note": "x" * 6000}
    client.delete_run(tracker.run_id)  # a deleted run refuses writes: the store rejects the next record
    tracker.log_metrics({"a": 2.0}, 1)
    assert tracker.flush(timeout=30)
    assert warned("rejected the metrics of step 1")
    client.restore_run(tracker.run_id)
    tracker.log_metrics({"a": 3.0}, 2)
    tracker.close()
    assert history(tracker.tracking_uri, tracker.run_id, "a") == [(0, 1.0), (2, 3.0)]


def test_sanitize_key():
    assert sanitize_key("train/lr(1e-3)") == "train/lr_1e-3_"
    assert sanitize_key("gate/weight_mean") == "gate/weight_mean"
    assert sanitize_key("/a//b/./c/") == "a/b/c"
    assert sanitize_key("../x/..") == "__/x/__"
    assert sanitize_key("..hidden") == "_.hidden"
    assert sanitize_key("é: ok-1.5 x") == "é_ ok-1.5 x"
    assert sanitize_key("") == "_" and sanitize_key("/") == "_"
    assert len(sanitize_key("k" * 300)) == 250


@pytest.mark.parametrize("key, value", [
    ("retry_interval_s", 0), ("retry_interval_s", -1.0), ("retry_interval_s", float("inf")),
    ("request_timeout_s", 0.0), ("request_timeout_s", "10"), ("request_timeout_s", True),
    ("experiment", ""), ("experiment", "  "), ("tracking_uri", ""), ("run_name", " "), ("enabled", "yes"),
])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=f"tracking.{key} "):
        TrackingConfig(**{key: value})


def test_disabled_tracker_does_nothing(tmp_path):
    tracker = Tracker(TrackingConfig(enabled=False), tmp_path)
    tracker.log_params({"a": 1})
    tracker.log_metrics({"b": 2.0}, 0)
    tracker.log_text("c", "c.txt")
    assert tracker.flush(timeout=0) and tracker.state_dict() == {"run_id": None}
    tracker.close()
    assert not (tmp_path / "mlflow").exists()


def test_silent_server_costs_only_the_request_timeout(tmp_path, monkeypatch, warned):
    """A server that accepts connections and never answers: MLflow's own retries are off and its request timeout is
    the config's, so the sender notices within seconds, and close gives up after one failed attempt."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "")  # recorded so that the test's value is undone afterwards
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        tracker = Tracker(TrackingConfig(tracking_uri=url, retry_interval_s=0.2, request_timeout_s=1), tmp_path)
        start = time.monotonic()
        tracker.log_metrics({"a": 1.0}, 0)
        tracker.log_metrics({"b": 2.0}, 1, mark=7)  # kept by its owner (metrics.jsonl): not in pending.jsonl
        while not warned("unreachable") and time.monotonic() - start < 10:
            time.sleep(0.05)
        assert 0.9 < time.monotonic() - start < 4
        start = time.monotonic()
        tracker.close(timeout=30)
        assert time.monotonic() - start < 5
    assert (tmp_path / "mlflow" / "pending.jsonl").is_file() and tracker.run_id is None
    kept = [json.loads(line) for line in (tmp_path / "mlflow" / "pending.jsonl").read_text().splitlines()]
    assert [r["metrics"] for r in kept if r["op"] == "metrics"] == [[["a", 1.0]]] and tracker.sent_mark() is None


@pytest.mark.slow
def test_env_tracking_uri_is_honoured(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    cfg = TrackingConfig(experiment="env-uri")
    assert resolve_tracking_uri(cfg, tmp_path) == server.url
    tracker = Tracker(cfg, tmp_path / "run")
    tracker.log_metrics({"reward/mean": 0.5}, 0)
    tracker.log_text("hello", "notes/hello.txt")
    tracker.close()
    assert not (tmp_path / "run" / "mlflow" / "mlflow.db").exists()
    client = MlflowClient(server.url)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert history(server.url, tracker.run_id, "reward/mean") == [(0, 0.5)]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "notes")] == ["notes/hello.txt"]


@pytest.mark.slow
def test_server_outage_loses_nothing(server, tmp_path, warned):
    cfg = TrackingConfig(tracking_uri=server.url, experiment="outage", retry_interval_s=0.5, request_timeout_s=2)
    early = Tracker(cfg, tmp_path / "early")
    for step in range(3):
        early.log_metrics({"reward/mean": step / 10, "step/id": step}, step)
    assert early.flush(timeout=60)

    server.kill()
    try:
        for step in range(3, 6):
            start = time.monotonic()
            early.log_metrics({"reward/mean": step / 10, "step/id": step}, step)
            assert time.monotonic() - start < 1
        assert not early.flush(timeout=1)
        late = Tracker(cfg, tmp_path / "late")  # created while the server is down
        late.log_params({"seed": 1})
        late.log_metrics({"reward/mean": 1.5}, 0)
        late.log_metrics({"reward/mean": 2.5}, 1)
        assert not late.flush(timeout=1) and late.run_id is None
    finally:
        server.start()

    assert early.flush(timeout=60) and late.flush(timeout=60)
    assert history(server.url, early.run_id, "reward/mean") == [(s, s / 10) for s in range(6)]
    assert history(server.url, early.run_id, "step/id") == [(s, float(s)) for s in range(6)]
    assert late.run_id and find_run_id(tmp_path / "late") == late.run_id
    assert history(server.url, late.run_id, "reward/mean") == [(0, 1.5), (1, 2.5)]
    assert MlflowClient(server.url).get_run(late.run_id).data.params == {"seed": "1"}
    assert len(warned("is unreachable")) == 2 and len(warned("reachable again")) == 2  # one pair per tracker
    early.close()
    late.close()


@pytest.mark.slow
def test_close_while_server_down_is_sent_by_the_next_tracker(server, tmp_path):
    cfg = TrackingConfig(tracking_uri=server.url, experiment="pending", retry_interval_s=0.5, request_timeout_s=2)
    created, never = tmp_path / "created", tmp_path / "never"
    first = Tracker(cfg, created)
    first.log_params({"lr": 0.1})
    first.log_metrics({"reward/mean": 0.0}, 0)
    first.log_metrics({"reward/mean": 0.1}, 1)
    assert first.flush(timeout=60)
    run_id = first.run_id

    server.kill()
    try:
        first.log_metrics({"reward/mean": 0.2}, 2)
        first.log_metrics({"reward/mean": 0.3}, 3)
        first.log_text("late note", "notes/late.txt")
        start = time.monotonic()
        first.close("KILLED")
        assert time.monotonic() - start < 5
        assert (created / "mlflow" / "pending.jsonl").is_file()
        unborn = Tracker(cfg, never)  # its run is never created before close
        unborn.log_metrics({"reward/mean": 5.0}, 0)
        unborn.close()
        assert (never / "mlflow" / "pending.jsonl").is_file() and find_run_id(never) is None
    finally:
        server.start()

    resumed = Tracker(cfg, created, run_id=run_id)
    resumed.log_params({"lr": 0.1})
    resumed.log_metrics({"reward/mean": 0.4}, 4)
    resumed.close()
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert history(server.url, run_id, "reward/mean") == [(s, s / 10) for s in range(5)]
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/late.txt"]
    assert not (created / "mlflow" / "pending.jsonl").exists()

    again = Tracker(cfg, never)  # no run id to resume: continues the run its pending records create
    again.log_metrics({"reward/mean": 6.0}, 1)
    again.close()
    experiment = client.get_experiment_by_name("pending")
    assert len(client.search_runs([experiment.experiment_id], "attributes.run_name = 'never'")) == 1
    assert history(server.url, again.run_id, "reward/mean") == [(0, 5.0), (1, 6.0)]
    assert find_run_id(never) == again.run_id and not (never / "mlflow" / "pending.jsonl").exists()


def _create_and_start_a_run(db: str, name: str, start, out) -> None:
    from megatron_sapo.tracking import create_sqlite_store

    start.wait()
    create_sqlite_store(Path(db))
    client = MlflowClient("sqlite:///" + db)
    experiment = client.get_experiment_by_name("Default")
    out.put(client.create_run(experiment.experiment_id, run_name=name).info.run_id)


def test_jobs_that_start_together_on_one_sqlite_store_all_keep_their_runs(tmp_path):
    """A sweep's Slurm array starts its cells at once on the sweep's sqlite store: one job creates it, under a lock;
    without the lock a later job's fresh store would replace the first one's, runs and all."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    db = str(tmp_path / "shared" / "mlflow.db")
    start, out = ctx.Event(), ctx.Queue()
    jobs = [ctx.Process(target=_create_and_start_a_run, args=(db, f"cell{i}", start, out)) for i in range(4)]
    for job in jobs:
        job.start()
    start.set()
    for job in jobs:
        job.join(120)
        assert job.exitcode == 0
    created = {out.get(timeout=5) for _ in jobs}
    client = MlflowClient("sqlite:///" + db)
    kept = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name("Default").experiment_id])}
    assert kept == created and len(kept) == 4


def test_runs_of_a_shared_sqlite_store_carry_their_tags_and_keep_artifacts_beside_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'sweep' / 'mlflow' / 'mlflow.db'}"
    for cell in ("a", "b"):
        tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment="sweep1", tags={"cell": cell, "seed": "1"}),
                          tmp_path / cell)
        tracker.log_metrics({"reward/mean": 0.5}, 1)
        tracker.log_text("hello", "notes/a.txt")
        tracker.close()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep1")
    assert experiment.artifact_location == (tmp_path / "sweep" / "mlflow" / "artifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["cell"] for r in runs) == ["a", "b"]
    assert all(r.data.tags["seed"] == "1" and r.data.tags["output_dir"].startswith(str(tmp_path)) for r in runs)
    for run in runs:
        assert (tmp_path / "sweep" / "mlflow" / "artifacts" / run.info.run_id / "artifacts" / "notes" /
                "a.txt").read_text() == "hello"
    with pytest.raises(ValueError, match="tracking.tags must be a mapping"):
        TrackingConfig(tags=["a"])
