"""The run recorder: metrics.jsonl is the record, and a resumed run fills MLflow in with what it missed (a crash
with records still queued, a server that was down), read back from a real embedded MLflow store."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from megatron_sapo.config import TrainConfig
from megatron_sapo.loop.checkpointer import Resumed
from megatron_sapo.loop.recorder import RunRecorder, read_history


def logged(out: Path, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(f"sqlite:///{out.resolve() / 'mlflow' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    return sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key))


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return TrainConfig(output_dir=str(tmp_path / "run"))


def test_a_crashed_runs_unsent_metrics_are_filled_in_on_resume(cfg):
    out = Path(cfg.output_dir)
    first = RunRecorder(cfg, out, Resumed())
    first.log(1, {"reward/mean": 0.1})
    assert first.tracker.flush(timeout=60)
    run_id = first.tracker.run_id
    first.tracker.close("FAILED")
    # the job then died with steps 2 and 3 written to metrics.jsonl but still queued for MLflow, the last line cut
    with (out / "metrics.jsonl").open("a") as f:
        for step in (2, 3):
            f.write(json.dumps({"step": step, "wall_time": 1_700_000_000 + step, "reward/mean": step / 10}) + "\n")
        f.write('{"step": 4, "reward/m')

    # resumed from the checkpoint of step 2: the missed step 2 is sent, at its own time; step 3 is redone, not sent
    resumed = RunRecorder(cfg, out, Resumed(2, {"mlflow_run_id": run_id}, out / "checkpoints" / "step_00000002"))
    resumed.log(3, {"reward/mean": 0.35})
    resumed.close("FINISHED")
    assert logged(out, "reward/mean") == [(1, 0.1), (2, 0.2), (3, 0.35)]
    assert read_history(out)["reward/mean"] == [(1, 0.1), (2, 0.2), (3, 0.35)]  # a step's last line counts


def test_a_new_run_in_a_used_output_dir_sends_only_its_own_steps(cfg):
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.9}) + "\n")  # an earlier run's
    recorder = RunRecorder(cfg, out, Resumed())
    recorder.log(1, {"reward/mean": 0.1})
    recorder.close("FINISHED")
    assert logged(out, "reward/mean") == [(1, 0.1)]
    assert (out / "plots" / "training_curves.png").is_file()


@pytest.mark.fault
def test_a_full_disk_under_metrics_is_a_named_error(small_disk, monkeypatch, fault_report):
    """A real full disk (a 256 KB tmpfs as output_dir, filled up after the recorder started): logging a step is a
    MetricsWriteError naming metrics.jsonl, "No space left on device" and the free space, not a bare OSError."""
    import subprocess

    from megatron_sapo.loop.recorder import MetricsWriteError
    from megatron_sapo.tracking import TrackingConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    disk = small_disk(256 << 10)
    cfg = TrainConfig(output_dir=str(disk / "run"), tracking=TrackingConfig(enabled=False))
    recorder = RunRecorder(cfg, disk / "run", Resumed())
    recorder.log(1, {"loss": 0.5})
    # the rest of the disk (dd stops at "No space left on device")
    subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=4k"], capture_output=True)
    wide = {f"metric_{i:03d}": 0.125 for i in range(200)}  # rows of ~4 KB: the file's last page fills at once
    with pytest.raises(MetricsWriteError) as raised:
        for step in range(2, 6):
            recorder.log(step, wide)
    message = str(raised.value)
    assert "metrics.jsonl: No space left on device" in message and "bytes free there" in message, message
    assert f"cannot write step {step}'s metrics" in message
    fault_report("disk full while writing metrics (256 KB tmpfs)", 1, 1, "the step being logged",
                 "named error; resumes from the newest checkpoint")
