"""The SGLang engine against two real SGLang servers on the CPU (their own environment, `make sglang-env`), with a
tiny Qwen3-MoE built offline: returned log-probs equal the transformers forward of the same tokens; requests are
spread over both servers (their own access logs say so); after a weight update, from a folder or broadcast over a
gloo process group, responses of both carry the new version and match the new weights; a server killed mid-batch is
restarted and the batch completes; the routed experts it returns are transformers' own (servers started with
--enable-return-routed-experts, which the CPU build needs tools/sglang_cpu_stubs/sitecustomize.py for); unreachable
servers, bad folders and bad tensors are clear errors."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from megatron_sapo.policy.parallel import free_port
from megatron_sapo.rollout import SamplingParams
from megatron_sapo.rollout.sglang import SGLangEngine, SGLangError, SGLangServer, _control
from megatron_sapo.rollout.weight_sync import WeightUpdateGroup

from ..policy.harness import REPO, assert_transformers_routes, tiny_models

pytestmark = pytest.mark.slow
PYTHON = os.environ.get("SAPO_SGLANG_PYTHON", str(REPO / ".venv-sglang" / "bin" / "python"))
# an idle SGLang scheduler spins a core unless told to sleep: two of them would take both cores of a small machine
CPU_ARGS = ("--device", "cpu", "--dtype", "float32", "--max-total-tokens", "16384", "--mem-fraction-static", "0.2",
            "--sleep-on-idle", "--enable-return-routed-experts")
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(REPO / "tools" / "sglang_cpu_stubs")}


def cpu_server(model_dir, log_path, **kwargs):
    return SGLangServer(model_dir, free_port(), python=PYTHON, log_path=log_path, extra_args=CPU_ARGS, env=CPU_ENV,
                        **kwargs)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not Path(PYTHON).exists():
        if os.environ.get("SAPO_SGLANG_PYTHON"):
            pytest.fail(f"SGLang environment missing: {PYTHON}")
        pytest.skip("SGLang environment not installed (make sglang-env)")
    import transformers

    root = tmp_path_factory.mktemp("sglang")
    tiny = tiny_models()
    tiny.build("qwen3_moe", root / "v0", seed=0)
    tiny.build("qwen3_moe", root / "v1", seed=1)
    servers = [cpu_server(root / "v0", root / f"server{i}.log") for i in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(SGLangServer.start, servers))
        yield root, SGLangEngine(transformers.AutoTokenizer.from_pretrained(root / "v0"), servers=servers)
    finally:
        for server in servers:
            server.stop()


def _teacher_forced(model_dir, c, temperature):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([c.prompt_ids + c.output_ids])).logits[0].double() / temperature
    start = len(c.prompt_ids)
    return torch.log_softmax(logits[start - 1:-1], -1).gather(-1, torch.tensor(c.output_ids)[:, None])[:, 0]


def _answered(engine, expected_total=None):
    """/generate requests each server has answered so far, counted in its own access log (waiting up to 5 s for
    `expected_total` of them to be logged)."""
    deadline = time.monotonic() + 5
    while True:
        counts = [s.log_path.read_text(errors="replace").count('"POST /generate HTTP/1.1" 200') for s in engine.servers]
        if expected_total is None or sum(counts) >= expected_total or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def _generate_on_both(engine, prompts, n, params):
    """The completions, after checking that both servers answered half of the requests each (round-robin)."""
    before = _answered(engine)
    out = [c for group in engine.generate(prompts, n, params) for c in group]
    after = _answered(engine, sum(before) + len(out))
    assert [a - b for a, b in zip(after, before)] == [len(out) // 2] * 2
    return out


def _assert_served_by(model_dir, completions, version):
    for c in completions:
        assert c.weight_version == version
        torch.testing.assert_close(torch.tensor(c.output_logprobs, dtype=torch.float64),
                                   _teacher_forced(model_dir, c, 1.0), rtol=0, atol=2e-5)


def test_log_probs_equal_transformers_forward(served):
    root, engine = served
    out = engine.generate(["3142:", "90:", "hello"], 2, SamplingParams(temperature=0.7, max_new_tokens=10, seed=0))
    assert [len(g) for g in out] == [2, 2, 2]
    for group in out:
        for c in group:
            assert len(c.output_ids) == len(c.output_logprobs) >= 1 and c.finish_reason in ("stop", "length")
            ref = _teacher_forced(root / "v0", c, 0.7)
            torch.testing.assert_close(torch.tensor(c.output_logprobs, dtype=torch.float64), ref, rtol=0, atol=2e-5)


def test_weight_update_is_versioned_and_takes_effect(served):
    root, engine = served
    engine.update_weights(root / "v1", "step-1")
    try:
        out = _generate_on_both(engine, ["3142:"], 2, SamplingParams(max_new_tokens=8, seed=2))
        _assert_served_by(root / "v1", out, "step-1")
    finally:
        engine.update_weights(root / "v0", "step-0")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        engine.update_weights(root / "nowhere", "bad")
    tiny_models().build("qwen3_moe", root / "wider", hidden_size=96)
    with pytest.raises(ValueError, match="does not fit the served model .*hidden_size 64 vs 96"):
        engine.update_weights(root / "wider", "bad")
    assert engine.generate(["90:"], 1, SamplingParams(max_new_tokens=2))[0][0].weight_version == "step-0"


def test_routes_are_the_experts_of_a_teacher_forced_forward(served):
    """return_routes: SGLang's routed experts (every fed token: the prompt, then each output token but the last)
    equal those transformers' routers pick in one teacher-forced forward of the whole sequence."""
    root, engine = served
    engine.update_weights(root / "v0", "step-0")
    routed = SGLangEngine(engine.tokenizer, urls=engine.urls, route_shape=(2, 2))
    routed.check_routes_available()
    out = routed.generate(["3142:", "90:"], 2, SamplingParams(max_new_tokens=6, seed=3), return_routes=True)
    assert_transformers_routes(root / "v0", [c for group in out for c in group])


def test_r3_makes_the_trainers_log_probs_sglangs_on_a_near_tie_model(served):
    """A near-tie model (tests/policy/test_routing.py) served by SGLang: SGLang and Megatron-Core break the routers'
    near-ties differently (float rounding), so without replay the trainer's old log-probs miss SGLang's by ~1e-3; with
    R3 (SGLang's routes replayed) they agree to float noise. One process, the learner's own path. Measured: without
    replay engine_agree 0.54, mismatch mean 8.6e-4 (max 1.2e-2); R3 1.8e-7 (max 4.8e-7)."""
    from megatron_sapo.config import load_config
    from megatron_sapo.loop.learner import Learner
    from megatron_sapo.policy import parallel
    from megatron_sapo.policy.policy import Policy
    from megatron_sapo.rollout.batch import collate

    from ..policy.test_routing import near_tie_model

    root, engine = served
    near_tie_model(root / "tie", num_experts=4)
    engine.update_weights(root / "tie", "tie")
    try:
        routed = SGLangEngine(engine.tokenizer, urls=engine.urls, route_shape=(2, 2))
        groups = routed.generate(["3142:", "90:", "hello", "abc"], 4, SamplingParams(max_new_tokens=10, seed=4),
                                 return_routes=True)
    finally:
        engine.update_weights(root / "v0", "step-0")
    completions = [c for group in groups for c in group]
    batch = collate(completions, torch.randn(16, generator=torch.Generator().manual_seed(2)),
                    engine.tokenizer.pad_token_id)
    parallel.init_distributed()
    got = {}
    for mode in ("none", "r3"):
        cfg = load_config(None, [f"policy.model_path={root / 'tie'}", f"policy.routing_replay={mode}",
                                 "policy.lr=1e-6", "trainer.mini_batches=2", "policy.micro_batch_size=2"])
        got[mode] = Learner(Policy(cfg.policy), cfg).update(batch, 0)
    none, r3 = got["none"], got["r3"]
    assert none["routing/engine_agree"] < 0.9, none
    assert r3["mismatch/abs_diff_max"] < 2e-5 and none["mismatch/abs_diff_mean"] > 10 * r3["mismatch/abs_diff_mean"]


def test_requests_are_spread_over_both_servers(served):
    _, engine = served
    out = _generate_on_both(engine, ["3142:", "90:"], 4, SamplingParams(max_new_tokens=4, seed=5))
    assert len(out) == 8 and all(len(c.output_ids) >= 1 for c in out)


def test_weights_broadcast_over_a_process_group_reach_both_servers(served):
    from safetensors.torch import load_file

    root, engine = served
    v1 = load_file(str(root / "v1" / "model.safetensors"))
    params = SamplingParams(max_new_tokens=8, seed=6)
    with WeightUpdateGroup(engine.urls, master_address="127.0.0.1", backend="gloo", bucket_bytes=64 << 10,
                           timeout=60) as group:
        assert group.world_size == 3
        group.update(v1.items(), "dist-1")  # ~0.7 MB in 64 KB buckets: a dozen broadcasts
        _assert_served_by(root / "v1", _generate_on_both(engine, ["3142:", "90:"], 2, params), "dist-1")
        with pytest.raises(ValueError, match="'model.bogus.weight' is not a tensor of the served model"):
            group.update([("model.bogus.weight", torch.zeros(64))], "bad")
        with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \[3\], the served model's is \[64\]"):
            group.update([("model.norm.weight", torch.zeros(3))], "bad")
        # servers that lost their membership, as a restarted one has, refuse at once; the group is then unusable
        for url in engine.urls:
            _control(url, "/destroy_weights_update_group", {"group_name": group.group_name}, 30)
        with pytest.raises(SGLangError, match="refused /update_weights_from_distributed: .*init_weights_update_group"):
            group.update(v1.items(), "dist-2")
        with pytest.raises(SGLangError, match="is unusable"):
            group.update(v1.items(), "dist-2")
    _assert_served_by(root / "v1", _generate_on_both(engine, ["90:"], 2, params), "dist-1")
    engine.update_weights(root / "v0", "step-0")  # the disk path still works afterwards
    _assert_served_by(root / "v0", _generate_on_both(engine, ["3142:"], 2, params), "step-0")


@pytest.mark.fault
def test_killed_server_is_restarted_and_the_batch_completes(served, caplog, fault_report):
    root, engine = served
    engine.update_weights(root / "v0", "step-0")
    server = engine.servers[0]

    def kill_soon():
        time.sleep(0.5)
        os.killpg(server.process.pid, 9)
    threading.Thread(target=kill_soon).start()
    out = engine.generate(["3142:"] * 8, 4, SamplingParams(max_new_tokens=64, seed=3))
    assert sum(len(g) for g in out) == 32 and all(len(c.output_ids) >= 1 for g in out for c in g)
    assert engine.stats["restarts"] >= 1 and server.alive()
    # each retry and the restart are logged, naming the server
    said = [r.getMessage() for r in caplog.records if r.name == "megatron_sapo.rollout.sglang"]
    assert sum("retry" in m and server.url in m for m in said) == engine.stats["retries"] >= 1
    assert any(f"SGLang server {server.url} is gone" in m for m in said)
    assert any(f"SGLang server {server.url} restarted" in m for m in said)
    # the restarted server serves the last update's weights under its version (not SGLang's "default")
    again = engine.generate(["3142:"] * 4, 1, SamplingParams(max_new_tokens=2, seed=4))
    assert {c.weight_version for g in again for c in g} == {"step-0"}
    assert server.model_dir == str(root / "v0")
    fault_report("an SGLang server SIGKILLed mid-batch", 1, 1, 0, "restarted; the batch completes")


@pytest.mark.fault
def test_servers_killed_or_hung_during_a_weight_update_are_restarted_with_the_new_weights(served, caplog,
                                                                                             fault_report):
    """One update, two faults, real signals: server 0 is stopped (SIGSTOP) as the update begins and SIGKILLed while
    the update request waits on it (killed mid-update); server 1 is stopped and stays stopped (hung). The engine's
    update returns with both servers restarted from the new folder, tagged with the new version, serving its
    weights; the hang is detected by the timeouts (request, then /health), not by the process dying."""
    root, engine = served
    engine.update_weights(root / "v0", "step-0")
    first, second = engine.servers
    restarts = engine.stats["restarts"]
    saved = engine.request_timeout, engine.hang_timeout
    engine.request_timeout, engine.hang_timeout = 8.0, 4.0
    for server in (first, second):
        os.killpg(server.process.pid, signal.SIGSTOP)

    def kill_first():
        time.sleep(2.0)  # the update request to server 0 is in flight, unanswered
        os.killpg(first.process.pid, signal.SIGKILL)
    killer = threading.Thread(target=kill_first)
    began = time.monotonic()
    try:
        killer.start()
        engine.update_weights(root / "v1", "step-1")
    finally:
        killer.join()
        engine.request_timeout, engine.hang_timeout = saved
    took = time.monotonic() - began
    assert engine.stats["restarts"] == restarts + 2 and first.alive() and second.alive()
    said = [r.getMessage() for r in caplog.records if r.name == "megatron_sapo.rollout.sglang"]
    assert any(f"SGLang server {first.url} is gone" in m for m in said), said
    assert any(f"SGLang server {second.url} does not answer /health within 4 s" in m for m in said), said
    assert first.model_dir == second.model_dir == str(root / "v1")
    _assert_served_by(root / "v1", _generate_on_both(engine, ["3142:"], 2, SamplingParams(max_new_tokens=8, seed=5)),
                      "step-1")
    fault_report("SGLang servers SIGKILLed / hung (SIGSTOP) during a disk weight update", 2, 2, 0,
                 f"{took:.0f} s for the update with both restarted")


@pytest.mark.fault
def test_a_server_hung_during_generation_is_restarted_and_the_batch_completes(served, caplog, fault_report):
    """SIGSTOP of a server while a batch is generated: its requests time out, the server does not answer /health,
    it is killed and restarted with the last update's weights and version, and the batch completes."""
    root, engine = served
    engine.update_weights(root / "v0", "step-0")
    server = engine.servers[1]
    restarts = engine.stats["restarts"]
    saved = engine.request_timeout, engine.hang_timeout
    engine.request_timeout, engine.hang_timeout = 8.0, 4.0

    def stop_soon():
        time.sleep(0.5)
        os.killpg(server.process.pid, signal.SIGSTOP)
    stopper = threading.Thread(target=stop_soon)
    began = time.monotonic()
    try:
        stopper.start()
        out = engine.generate(["3142:"] * 8, 4, SamplingParams(max_new_tokens=64, seed=3))
        took = time.monotonic() - began
    finally:
        stopper.join()
        engine.request_timeout, engine.hang_timeout = saved
    assert sum(len(g) for g in out) == 32 and engine.stats["restarts"] == restarts + 1 and server.alive()
    assert {c.weight_version for g in out for c in g} == {"step-0"}
    said = [r.getMessage() for r in caplog.records if r.name == "megatron_sapo.rollout.sglang"]
    assert any(f"SGLang server {server.url} does not answer /health" in m for m in said), said
    _assert_served_by(root / "v0", _generate_on_both(engine, ["3142:"], 2, SamplingParams(max_new_tokens=8, seed=6)),
                      "step-0")
    fault_report("an SGLang server hung (SIGSTOP) during generation", 1, 1, 0, f"{took:.0f} s for the batch")


def test_unreachable_server_and_bad_startup_are_named(served, tmp_path):
    root, engine = served
    with pytest.raises(SGLangError, match="is unreachable"):
        SGLangEngine(engine.tokenizer, urls=[f"http://127.0.0.1:{free_port()}"])
    broken = cpu_server(tmp_path, tmp_path / "broken.log", startup_timeout=120)
    with pytest.raises(SGLangError, match="exited with code"):
        broken.start()
    with pytest.raises(ValueError, match="empty or non-string prompts"):
        engine.generate([""], 1, SamplingParams())
