"""End-to-end training through the `megatron-sapo train` command, as users run it: the demo recipe on a smaller
batch with the embedded engine, with a real SGLang server, and on two processes with expert parallelism. Each run
is checked through what it leaves behind: the MLflow run (read with MLflow's own client), the checkpoints, the
exported weights, the sample completions (whose rewards are recomputed here from the task's definition)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("megatron-sapo"))
SGLANG_PYTHON = os.environ.get("SAPO_SGLANG_PYTHON", str(REPO / ".venv-sglang" / "bin" / "python"))

pytestmark = pytest.mark.slow


def train(demo: Path, out: Path, *overrides: str, launcher=(), env=None, timeout=600):
    args = [*launcher, CLI, "train", str(REPO / "recipes" / "tiny_cpu.yaml"), f"output_dir={out}",
            f"policy.model_path={demo / 'model'}", f"data.train_files=[{demo / 'train.jsonl'}]",
            f"data.eval_files=[{demo / 'eval.jsonl'}]", "data.prompts_per_step=8", "trainer.eval_prompts=16",
            *overrides]
    run_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    run_env.update(OMP_NUM_THREADS="1", **(env or {}))
    result = subprocess.run(args, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def steps_of(client, run, key):
    return sorted({m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}.items())


def manifest(path: Path) -> dict:
    return json.loads((path / "megatron_sapo.json").read_text())


def check_samples(client, run, step: int) -> None:
    """The eval completions logged at `step`: their rewards follow the task's rule (sorted prompt digits)."""
    local = client.download_artifacts(run.info.run_id, f"samples/step_{step:08d}.json")
    rows = json.loads(Path(local).read_text())
    assert rows
    for row in rows:
        expected = "".join(sorted(row["prompt"].rstrip(":")))
        assert row["answer"] == expected
        assert row["reward"] == float(row["completion"].strip() == expected), row
        assert row["weight_version"] == str(step)


def test_embedded_run_tracks_checkpoints_and_resumes(demo, tmp_path):
    out = tmp_path / "run"
    log = train(demo, out, "trainer.steps=3", "trainer.eval_every=2", "trainer.checkpoint_every=2")
    assert "step 3/3" in log and "eval at step 2: pass@1" in log and "loss_type: sapo" in log
    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.data.params["loss.loss_type"] == "sapo"
    assert run.data.params["rollout.engine"] == "embedded" and run.data.params["trainer.steps"] == "3"
    rewards = steps_of(client, run, "reward/mean")
    assert [s for s, _ in rewards] == [1, 2, 3] and all(0 <= v <= 1 for _, v in rewards)
    assert [s for s, _ in steps_of(client, run, "eval/pass_at_1")] == [0, 2, 3]
    for key in ("reward/std", "response/length_mean", "gate/weight_mean", "ratio/max", "clip/frac", "train/grad_norm",
                "train/lr", "time/rollout_s", "time/train_s", "time/sync_s", "throughput/tokens_per_s"):
        assert [s for s, _ in steps_of(client, run, key)] == [1, 2, 3], key
    assert all(v == 0 for _, v in steps_of(client, run, "rollout/stale_frac"))
    assert all(v == 0 for _, v in steps_of(client, run, "train/skipped_updates"))
    assert steps_of(client, run, "clip/frac") == [(1, 0.0), (2, 0.0), (3, 0.0)]  # SAPO never clips
    check_samples(client, run, 2)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "samples", "plots"} <= artifacts
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert manifest(out / "checkpoints" / "step_00000003")["extra"]["trainer_step"] == 3
    assert manifest(out / "checkpoints" / "step_00000003")["extra"]["mlflow_run_id"] == run.info.run_id
    assert (out / "checkpoints" / "step_00000002").is_dir()
    assert (out / "weights" / "step_00000003" / "model.safetensors").is_file()

    log = train(demo, out, "trainer.steps=5", "trainer.eval_every=2")
    assert "resuming from" in log and "step 5/5" in log and "step 3/5" not in log
    client, resumed = mlflow_run(out)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert [s for s, _ in steps_of(client, resumed, "reward/mean")] == [1, 2, 3, 4, 5]
    assert steps_of(client, resumed, "reward/mean")[:3] == rewards
    assert [s for s, _ in steps_of(client, resumed, "eval/pass_at_1")] == [0, 2, 3, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000005"]
    assert "already at step 5 of 5" in train(demo, out, "trainer.steps=5")


@pytest.mark.skipif(not Path(SGLANG_PYTHON).exists() and not os.environ.get("SAPO_SGLANG_PYTHON"),
                    reason="SGLang environment not installed (make sglang-env)")
@pytest.mark.parametrize("weight_sync", ["disk", "distributed"])
def test_sglang_run(demo, tmp_path, weight_sync):
    out = tmp_path / "run"
    log = train(demo, out, "rollout.engine=sglang", f"rollout.sglang.python={SGLANG_PYTHON}", "trainer.steps=2",
                "trainer.eval_every=2", f"rollout.sglang.weight_sync={weight_sync}")
    assert "weight sync failed" not in log
    assert "starting SGLang server 0" in log and "step 2/2" in log
    client, run = mlflow_run(out)
    assert run.data.params["rollout.engine"] == "sglang"
    assert [s for s, _ in steps_of(client, run, "reward/mean")] == [1, 2]
    assert all(v == 0 for _, v in steps_of(client, run, "rollout/stale_frac"))  # every sample had the new weights
    # the engine's log-probs are the policy's own at the same weights: mismatch KL ~ 0
    assert all(abs(v) < 1e-4 for _, v in steps_of(client, run, "mismatch/k3"))
    check_samples(client, run, 2)
    assert (out / "logs" / "sglang_0.log").is_file()
    leftover = subprocess.run(["pgrep", "-f", str(out / "weights")], capture_output=True, text=True).stdout
    assert not leftover.strip(), "the SGLang server outlived the run"


def test_two_processes_with_expert_parallelism(demo, tmp_path):
    out = tmp_path / "run"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python")
    log = train(demo, out, "policy.expert_model_parallel_size=2", "policy.moe_token_dispatcher=alltoall",
                "trainer.steps=2", "trainer.eval_every=0", launcher=launcher, env={"GLOO_SOCKET_IFNAME": "lo"})
    assert "(2 processes)" in log and "step 2/2" in log
    client, run = mlflow_run(out)
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    assert sorted(m.step for m in history) == [1, 2]  # rank 0 alone logs
    assert manifest(out / "checkpoints" / "step_00000002")["world_size"] == 2
    assert all(v == 0 for _, v in steps_of(client, run, "train/skipped_updates"))


def test_tracking_server_down_during_a_run_loses_no_metrics(demo, tmp_path):
    """The tracking server is down for a whole run: training finishes anyway, and the metrics it could not send are
    sent by the resumed run once the server is up, into the same MLflow run."""
    from mlflow.tracking import MlflowClient

    from .test_tracking import SERVER_PYTHON as MLFLOW_PYTHON
    from .test_tracking import MlflowServer

    if not Path(MLFLOW_PYTHON).exists():
        if os.environ.get("SAPO_MLFLOW_PYTHON"):
            pytest.fail(f"MLflow server environment missing: {MLFLOW_PYTHON}")
        pytest.skip("MLflow server environment not installed (make mlflow-server-env)")
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")  # not started yet: its port refuses connections
    out = tmp_path / "run"
    env = {"MLFLOW_TRACKING_URI": server.url}
    log = train(demo, out, "trainer.steps=2", "trainer.eval_every=0", "tracking.retry_interval_s=1", env=env)
    assert "step 2/2" in log and "unreachable" in log
    assert (out / "mlflow" / "pending.jsonl").is_file()
    server.start()
    try:
        log = train(demo, out, "trainer.steps=4", "trainer.eval_every=0", "tracking.retry_interval_s=1", env=env)
        assert "resuming from" in log
        client = MlflowClient(server.url)
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        expected = [(row["step"], row["reward/mean"]) for row in logged]
        assert [s for s, _ in expected] == [1, 2, 3, 4]
        history = client.get_metric_history(runs[0].info.run_id, "reward/mean")
        assert sorted((m.step, m.value) for m in history) == expected  # each step once, the values as trained
    finally:
        server.kill()
