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
import torch

from .runs import run_env

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("megatron-sapo"))
SGLANG_PYTHON = os.environ.get("SAPO_SGLANG_PYTHON", str(REPO / ".venv-sglang" / "bin" / "python"))

pytestmark = pytest.mark.slow


def train(demo: Path, out: Path, *overrides: str, launcher=(), env=None, timeout=600, check=True):
    args = [*launcher, CLI, "train", str(REPO / "recipes" / "tiny_cpu.yaml"), f"output_dir={out}",
            f"policy.model_path={demo / 'model'}", f"data.train_files=[{demo / 'train.jsonl'}]",
            f"data.eval_files=[{demo / 'eval.jsonl'}]", "data.prompts_per_step=8", "trainer.eval_prompts=16",
            *overrides]
    result = subprocess.run(args, cwd=REPO, env=run_env(**(env or {})), capture_output=True, text=True,
                            timeout=timeout)
    if not check:
        return result.returncode, result.stdout + result.stderr
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


def metrics_rows(out: Path) -> dict[int, dict]:
    """metrics.jsonl by step (a step logged twice keeps its last row), without the wall-clock timings."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row.pop("step")] = {k: v for k, v in row.items()
                                 if not k.startswith(("time/", "throughput/")) and k != "wall_time"}
    return rows


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
                "train/lr", "time/rollout_s", "time/train_s", "time/sync_s", "time/sync_wait_s",
                "throughput/tokens_per_s"):
        assert [s for s, _ in steps_of(client, run, key)] == [1, 2, 3], key
    assert all(v == 0 for _, v in steps_of(client, run, "rollout/stale_frac"))
    assert [v for _, v in steps_of(client, run, "rollout/staleness")] == [0, 0, 0]  # synchronous: the default
    assert all(v == 0 for _, v in steps_of(client, run, "train/skipped_updates"))
    # the later mini-batches are off-policy: the gate acts (weights below 1) without being extreme
    gate_min, gate_mean = steps_of(client, run, "gate/weight_min"), steps_of(client, run, "gate/weight_mean")
    assert all(0 < lo <= mean <= 1 for (_, lo), (_, mean) in zip(gate_min, gate_mean)) and min(gate_min)[1] < 1
    # the embedded engine's log-probs of its own samples are the trainer's at the same weights
    assert all(v < 2e-5 for _, v in steps_of(client, run, "mismatch/abs_diff_max"))
    check_samples(client, run, 2)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "samples", "plots"} <= artifacts
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert manifest(out / "checkpoints" / "step_00000003")["extra"]["trainer_step"] == 3
    assert manifest(out / "checkpoints" / "step_00000003")["extra"]["mlflow_run_id"] == run.info.run_id
    assert (out / "checkpoints" / "step_00000002").is_dir()
    assert (out / "weights" / "step_00000003" / "model.safetensors.index.json").is_file()

    log = train(demo, out, "trainer.steps=5", "trainer.eval_every=2")
    assert "resuming from" in log and "step 5/5" in log and "step 3/5" not in log
    client, resumed = mlflow_run(out)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert [s for s, _ in steps_of(client, resumed, "reward/mean")] == [1, 2, 3, 4, 5]
    assert steps_of(client, resumed, "reward/mean")[:3] == rewards
    assert [s for s, _ in steps_of(client, resumed, "eval/pass_at_1")] == [0, 2, 3, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000005"]
    assert "already at step 5 of 5" in train(demo, out, "trainer.steps=5")

    # the same 5 steps without the interruption: every later metric and the final weights bit for bit
    straight = tmp_path / "straight"
    train(demo, straight, "trainer.steps=5", "trainer.eval_every=2", "trainer.checkpoint_every=2")
    resumed_rows, straight_rows = metrics_rows(out), metrics_rows(straight)
    assert sorted(resumed_rows) == sorted(straight_rows) == [0, 1, 2, 3, 4, 5]
    for step in (1, 2, 3, 4, 5):  # the interrupted run also evaluated at its last step, 3
        got = {k: v for k, v in resumed_rows[step].items() if step != 3 or not k.startswith("eval/")}
        assert got == straight_rows[step], step
    from megatron_sapo.policy.hf_weights import read_safetensors

    final = read_safetensors(out / "weights" / "step_00000005")
    expected = read_safetensors(straight / "weights" / "step_00000005")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], v) for k, v in expected.items())


def test_async_rollouts_resume_as_if_never_stopped(demo, tmp_path):
    """trainer.max_staleness=1 with the embedded engine in a process of its own: the batch of step n is sampled by
    the weights after step n - 2 (its engine log-probs then differ from the trainer's by far more than float
    rounding), every completion carries that version, and a run stopped at step 2 (its checkpoint holds the batches
    generated ahead) and resumed to step 4 gives every metric and the final weights of an uninterrupted run, bit for
    bit. The run sizes micro-batches by tokens (policy.max_tokens_per_micro_batch), so the same holds for the
    budget's plans (the rows' balance and micro-batches are planned again, alike, after the resume)."""
    async_run = ("trainer.max_staleness=1", "trainer.eval_every=2", "trainer.checkpoint_every=0",
                 "policy.max_tokens_per_micro_batch=64")
    out = tmp_path / "run"
    log = train(demo, out, *async_run, "trainer.steps=2")
    assert "embedded engine in a process of its own" in log and "step 2/2" in log
    ahead = torch.load(out / "checkpoints" / "step_00000002" / "rollouts.pt", weights_only=True)
    # steps 3 and 4's batches: sampled by the weights after steps 1 and 2 (the checkpoint's own)
    assert [(b["index"], b["version"]) for b in ahead] == [(2, 1), (3, 2)]
    log = train(demo, out, *async_run, "trainer.steps=4")
    assert "resuming from" in log and "step 4/4" in log
    straight = tmp_path / "straight"
    train(demo, straight, *async_run, "trainer.steps=4")
    resumed_rows, straight_rows = metrics_rows(out), metrics_rows(straight)
    assert sorted(resumed_rows) == sorted(straight_rows) == [0, 1, 2, 3, 4]
    for step in range(5):
        assert resumed_rows[step] == straight_rows[step], step
    assert [straight_rows[s]["rollout/staleness"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    # rows of at most 13 tokens, 16 per update: several micro-batches each, little padding
    assert all(straight_rows[s]["train/micro_batches"] > 8 and straight_rows[s]["train/token_efficiency"] > 0.85
               for s in (1, 2, 3, 4)), straight_rows[1]
    assert all(straight_rows[s]["rollout/stale_frac"] == 0 for s in (1, 2, 3, 4))
    assert straight_rows[1]["mismatch/abs_diff_max"] < 2e-5  # sampled by the weights it trains
    assert all(straight_rows[s]["mismatch/abs_diff_max"] > 1e-2 for s in (2, 3, 4))  # by the step before's
    client, run = mlflow_run(straight)
    check_samples(client, run, 4)  # evaluation uses the newest weights
    from megatron_sapo.policy.hf_weights import read_safetensors

    final = read_safetensors(out / "weights" / "step_00000004")
    expected = read_safetensors(straight / "weights" / "step_00000004")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], v) for k, v in expected.items())


def policy_log_probs(demo: Path, checkpoint: Path | None = None) -> torch.Tensor:
    """Log-probs of the demo's held-out prompts followed by their answers under the demo model, or under the policy
    of a checkpoint of it (Megatron, one process)."""
    import transformers

    from megatron_sapo.policy.checkpoint import load_checkpoint
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy

    tokenizer = transformers.AutoTokenizer.from_pretrained(demo / "model")
    rows = [json.loads(line) for line in (demo / "eval.jsonl").read_text().splitlines()]
    ids = torch.tensor([tokenizer(r["prompt"] + r["answer"], add_special_tokens=False)["input_ids"] for r in rows])
    policy = Policy(PolicyConfig(model_path=str(demo / "model")))
    if checkpoint is not None:
        load_checkpoint(policy, checkpoint)
    return policy.log_probs(ids)


@pytest.mark.skipif(not Path(SGLANG_PYTHON).exists() and not os.environ.get("SAPO_SGLANG_PYTHON"),
                    reason="SGLang environment not installed (make sglang-env)")
@pytest.mark.parametrize("weight_sync, max_staleness, replay", [("disk", 0, "none"), ("distributed", 0, "r3"),
                                                                 ("disk", 1, "r2")])
def test_sglang_run(demo, tmp_path, weight_sync, max_staleness, replay):
    """The SGLang server serves what the trainer holds: at step 2 (weights synced after step 1) its log-probs of
    every sampled token equal the trainer's old log-probs to 2e-5, while step 1 moved the policy's log-probs by far
    more than that (measured here from the checkpoints), so a sync that did nothing could not pass. Asynchronous
    (max_staleness=1): step 2's batch is generated during step 1, by the weights before it, and every completion
    says so; the evaluation after step 2 runs on the newest weights. Routing replay rides along: R3 with the
    distributed sync (SGLang started with --enable-return-routed-experts by the trainer, its routes replayed), R2
    with the asynchronous run; the routing metrics reach MLflow."""
    out = tmp_path / "run"
    log = train(demo, out, "rollout.engine=sglang", f"rollout.sglang.python={SGLANG_PYTHON}", "trainer.steps=2",
                "trainer.eval_every=2", "trainer.checkpoint_every=1", f"rollout.sglang.weight_sync={weight_sync}",
                f"trainer.max_staleness={max_staleness}", f"policy.routing_replay={replay}")
    assert "weight sync failed" not in log
    assert "starting SGLang server 0" in log and "step 2/2" in log
    client, run = mlflow_run(out)
    assert run.data.params["rollout.engine"] == "sglang"
    assert [s for s, _ in steps_of(client, run, "reward/mean")] == [1, 2]
    assert all(v == 0 for _, v in steps_of(client, run, "rollout/stale_frac"))  # every sample had the due weights
    assert [v for _, v in steps_of(client, run, "rollout/staleness")] == [0, max_staleness]
    assert all(v == 0 for _, v in steps_of(client, run, "rollout/engine_restarts"))
    # the engine's log-probs are the policy's own at the same weights, token for token
    mismatch = steps_of(client, run, "mismatch/abs_diff_max")
    assert [s for s, _ in mismatch] == [1, 2] and mismatch[0][1] < 2e-5, mismatch
    assert mismatch[1][1] < 2e-5 if max_staleness == 0 else mismatch[1][1] > 1e-2, mismatch
    moved = (policy_log_probs(demo, out / "checkpoints" / "step_00000001") - policy_log_probs(demo)).abs().max()
    assert moved > 100 * 2e-5, moved
    check_samples(client, run, 2)
    assert [s for s, _ in steps_of(client, run, "routing/replay_agree")] == [1, 2]
    engine_agree = steps_of(client, run, "routing/engine_agree")
    assert (len(engine_agree) == 2 and all(0 < v <= 1 for _, v in engine_agree)) == (replay == "r3"), engine_agree
    assert (out / "logs" / "sglang_0.log").is_file()
    leftover = subprocess.run(["pgrep", "-f", str(out / "weights")], capture_output=True, text=True).stdout
    assert not leftover.strip(), "the SGLang server outlived the run"


# One RL step of two updates (the second off-policy, so its loss depends on the weights the first produced), without
# the MoE auxiliary loss: Megatron's "aux_loss" balances each data-parallel rank's own tokens, so with it a DP=2 run
# optimises another objective than one process (the policy tests check the auxiliary loss under TP and PP).
ONE_STEP = ("trainer.steps=1", "trainer.mini_batches=2", "trainer.eval_every=0", "policy.moe_aux_loss_coeff=0")
LAYOUTS = {"dp2": (), "tp2": ("policy.tensor_model_parallel_size=2",),
           "ep2": ("policy.expert_model_parallel_size=2",),
           "pp2": ("policy.pipeline_model_parallel_size=2",)}
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python")


@pytest.fixture(scope="module")
def one_process_step(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process") / "run"
    train(demo, out, *ONE_STEP)
    return metrics_rows(out)[1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_process_layouts_give_the_one_process_step(demo, tmp_path, one_process_step, layout):
    """The same RL step under DP=2, TP=2, EP=2 and PP=2 (on the CPU Megatron's allgather dispatcher carries the
    experts' tokens whatever policy.moe_token_dispatcher says): the same rollout (rank 0's engine
    samples from the exported weights), the single-process loss and gradient norm within float tolerance, and the
    loss library's metrics over all data-parallel ranks' rows (the same token and sequence counts)."""
    from megatron_sapo.losses import METRICS

    out = tmp_path / "run"
    log = train(demo, out, *ONE_STEP, *LAYOUTS[layout], launcher=TORCHRUN, env={"GLOO_SOCKET_IFNAME": "lo"})
    assert "(2 processes)" in log and "step 1/1" in log
    got, expected = metrics_rows(out)[1], one_process_step
    for key in ("reward/mean", "reward/std", "response/length_mean", "rollout/tokens", "count/tokens", "count/seqs"):
        assert got[key] == expected[key], key
    for key in ("train/loss", "train/grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), (key, got[key], expected[key])
    for key in set(expected) & set(METRICS):  # after the first update, float differences grow a little
        # the engine-vs-trainer differences are float rounding (~1e-6) in any layout: compared absolutely
        tolerance = dict(abs=1e-5) if key.startswith("mismatch/") else dict(rel=1e-4, abs=1e-9)
        assert got[key] == pytest.approx(expected[key], **tolerance), (key, got[key], expected[key])
    assert got["train/skipped_updates"] == 0
    client, run = mlflow_run(out)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")) == [1]  # rank 0 alone
    assert manifest(out / "checkpoints" / "step_00000001")["world_size"] == 2


@pytest.mark.fault
def test_tracking_server_down_during_a_run_loses_no_metrics(demo, tmp_path, fault_report):
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
    fault_report("the MLflow tracking server down for a whole run", 1, 1, 0,
                 "trains on; every step sent by the next start")


# PP=2 also packs its rows (policy.pack_sequences): the engine's routes must reach packed micro-batches in their order
PACKED = ("policy.max_tokens_per_micro_batch=64", "policy.pack_sequences=true")


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_r3_run_replays_the_engines_routes_on_every_rank(demo, tmp_path, layout):
    """`megatron-sapo train` with policy.routing_replay=r3 on two processes, under TP=2 (sequence parallel: each rank
    replays its own chunk of every sequence) and PP=2 (each stage its own MoE layers; rows packed into micro-batches
    of 64 tokens): the embedded engine's routes reach every rank in its token order, so the trainer's old log-probs
    are the engine's own (a route replayed at the wrong token or layer would move them by far more than 2e-5), and
    the routing agreement metrics reach MLflow."""
    out = tmp_path / "run"
    packed = PACKED if layout == "pp2" else ()
    log = train(demo, out, "trainer.steps=2", "trainer.eval_every=0", "trainer.checkpoint_every=0",
                "policy.routing_replay=r3", *LAYOUTS[layout], *packed, launcher=TORCHRUN,
                env={"GLOO_SOCKET_IFNAME": "lo"})
    assert "(2 processes)" in log and "step 2/2" in log
    client, run = mlflow_run(out)
    assert run.data.params["policy.routing_replay"] == "r3"
    assert all(v < 2e-5 for _, v in steps_of(client, run, "mismatch/abs_diff_max"))
    for key in ("routing/engine_agree", "routing/replay_agree", "routing/replay_agree_min_layer"):
        values = steps_of(client, run, key)
        assert [s for s, _ in values] == [1, 2] and all(0 < v <= 1 for _, v in values), (key, values)
    if packed:  # no padding at all: packed rows of the demo's short responses
        assert all(v == 1.0 for _, v in steps_of(client, run, "train/token_efficiency"))
        assert all(v > 4 for _, v in steps_of(client, run, "train/micro_batches"))


@pytest.mark.fault
def test_a_full_disk_stops_the_run_with_the_checkpoint_named_and_the_last_one_resumable(demo, tmp_path, small_disk,
                                                                                       fault_report):
    """A real full disk: output_dir on a 4 MB tmpfs, a checkpoint every step. The first checkpoint fits, the second
    does not: the run fails with a CheckpointError naming the checkpoint, the free space and the newest complete
    checkpoint (the tracker's own failing writes on the way out do not hide it), no partial checkpoint is left, and
    the run copied to a roomy disk resumes from step 1 and finishes."""
    import shutil

    disk = small_disk(4 << 20)
    code, log = train(demo, disk / "run", "trainer.steps=4", "trainer.checkpoint_every=1", "trainer.eval_every=0",
                      check=False)
    assert code != 0
    last = log.strip().splitlines()[-1]
    assert "CheckpointError: saving checkpoint step_00000002" in last and "0 bytes free" in last, last
    assert "the newest complete checkpoint is step_00000001, left as it was" in last, last
    assert sorted(p.name for p in (disk / "run" / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    shutil.copytree(disk / "run", tmp_path / "run")
    log = train(demo, tmp_path / "run", "trainer.steps=4", "trainer.checkpoint_every=1", "trainer.eval_every=0")
    assert "resuming from" in log and "step_00000001" in log and "step 4/4" in log
    fault_report("disk full while writing a checkpoint (4 MB tmpfs)", 1, 1, "1 (the step whose checkpoint failed)",
                 "named error; resumes from the previous checkpoint")
