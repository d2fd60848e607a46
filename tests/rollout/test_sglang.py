"""The SGLang engine against a real SGLang server on the CPU (its own environment, `make sglang-env`), with a tiny
Qwen3-MoE built offline: returned log-probs equal the transformers forward of the same tokens; after a weight update
responses carry the new version and match the new weights; a server killed mid-batch is restarted and the batch
completes; unreachable servers and bad folders are clear errors."""

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron_sapo.policy.parallel import free_port
from megatron_sapo.rollout import SamplingParams
from megatron_sapo.rollout.sglang import SGLangEngine, SGLangError, SGLangServer

from ..policy.harness import REPO, tiny_models

pytestmark = pytest.mark.slow
PYTHON = os.environ.get("SAPO_SGLANG_PYTHON", str(REPO / ".venv-sglang" / "bin" / "python"))
CPU_ARGS = ("--device", "cpu", "--dtype", "float32", "--max-total-tokens", "16384", "--mem-fraction-static", "0.2")
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
    server = cpu_server(root / "v0", root / "server.log")
    server.start()
    engine = SGLangEngine(transformers.AutoTokenizer.from_pretrained(root / "v0"), servers=[server])
    yield root, engine
    engine.shutdown()


def _teacher_forced(model_dir, c, temperature):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([c.prompt_ids + c.output_ids])).logits[0].double() / temperature
    start = len(c.prompt_ids)
    return torch.log_softmax(logits[start - 1:-1], -1).gather(-1, torch.tensor(c.output_ids)[:, None])[:, 0]


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
        c = engine.generate(["3142:"], 1, SamplingParams(max_new_tokens=8, seed=2))[0][0]
        assert c.weight_version == "step-1"
        torch.testing.assert_close(torch.tensor(c.output_logprobs, dtype=torch.float64),
                                   _teacher_forced(root / "v1", c, 1.0), rtol=0, atol=2e-5)
    finally:
        engine.update_weights(root / "v0", "step-0")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        engine.update_weights(root / "nowhere", "bad")
    tiny_models().build("qwen3_moe", root / "wider", hidden_size=96)
    with pytest.raises(ValueError, match="does not fit the served model .*hidden_size 64 vs 96"):
        engine.update_weights(root / "wider", "bad")
    assert engine.generate(["90:"], 1, SamplingParams(max_new_tokens=2))[0][0].weight_version == "step-0"


def test_killed_server_is_restarted_and_the_batch_completes(served):
    _, engine = served
    server = engine.servers[0]

    def kill_soon():
        time.sleep(0.5)
        os.killpg(server.process.pid, 9)
    threading.Thread(target=kill_soon).start()
    out = engine.generate(["3142:"] * 8, 4, SamplingParams(max_new_tokens=64, seed=3))
    assert sum(len(g) for g in out) == 32 and all(len(c.output_ids) >= 1 for g in out for c in g)
    assert engine.stats["restarts"] >= 1 and server.alive()


def test_unreachable_server_and_bad_startup_are_named(served, tmp_path):
    root, engine = served
    with pytest.raises(SGLangError, match="is unreachable"):
        SGLangEngine(engine.tokenizer, urls=[f"http://127.0.0.1:{free_port()}"])
    broken = cpu_server(tmp_path, tmp_path / "broken.log", startup_timeout=120)
    with pytest.raises(SGLangError, match="exited with code"):
        broken.start()
    with pytest.raises(ValueError, match="empty or non-string prompts"):
        engine.generate([""], 1, SamplingParams())
