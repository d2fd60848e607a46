"""The embedded engine against an independent computation: its returned log-probs equal a teacher-forced
transformers forward pass over prompt + completion (logits / temperature), for the current and updated weights."""

import pytest
import torch

from megatron_sapo.rollout import EmbeddedEngine, SamplingParams

from ..policy.harness import assert_transformers_routes, tiny_models

PROMPTS = ["3142:", "90:", "hello"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    tiny = tiny_models()
    tiny.build("qwen3_moe", root / "v0", seed=0)
    tiny.build("qwen3_moe", root / "v1", seed=1)
    return root


def _teacher_forced(model_dir, completion, temperature):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([completion.prompt_ids + completion.output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double() / temperature
    start = len(completion.prompt_ids)
    logp = torch.log_softmax(logits[start - 1:-1], -1)
    return logp.gather(-1, torch.tensor(completion.output_ids)[:, None])[:, 0]


def test_log_probs_equal_teacher_forced_forward(models):
    engine = EmbeddedEngine(models / "v0", version="v0")
    out = engine.generate(PROMPTS, 3, SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, seed=0))
    assert [len(group) for group in out] == [3, 3, 3]
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            assert engine.tokenizer.decode(c.prompt_ids) == prompt
            assert len(c.output_ids) == len(c.output_logprobs) >= 1 and c.weight_version == "v0"
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (len(c.output_ids) == 12 and engine.tokenizer.eos_token_id
                                                     not in c.output_ids)
            ref = _teacher_forced(models / "v0", c, 0.8)
            torch.testing.assert_close(torch.tensor(c.output_logprobs, dtype=torch.float64), ref, rtol=0,
                                       atol=2e-5)


def test_routes_are_the_experts_of_a_teacher_forced_forward(models):
    """return_routes: every token fed through the model (prompt positions without the left padding, then each output
    token but the last) carries the top-k expert ids transformers' routers pick for it in one teacher-forced
    forward of the whole sequence; without it, no routes."""
    engine = EmbeddedEngine(models / "v0")
    out = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=1), return_routes=True)
    assert_transformers_routes(models / "v0", [c for group in out for c in group])
    plain = engine.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=2, seed=1))
    assert plain[0][0].routes is None


def test_seeded_sampling_repeats_and_top_k_one_is_greedy(models):
    engine = EmbeddedEngine(models / "v0")
    params = SamplingParams(max_new_tokens=8, seed=3)
    first = [[c.output_ids for c in g] for g in engine.generate(PROMPTS, 2, params)]
    assert first == [[c.output_ids for c in g] for g in engine.generate(PROMPTS, 2, params)]
    greedy = engine.generate(["3142:"], 2, SamplingParams(top_k=1, max_new_tokens=6, seed=5))[0]
    assert greedy[0].output_ids == greedy[1].output_ids
    ids = greedy[0].prompt_ids + greedy[0].output_ids
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0]
    start = len(greedy[0].prompt_ids)
    assert logits[start - 1:-1].argmax(-1).tolist() == greedy[0].output_ids


def test_stop_string_ends_a_completion(models):
    """Exact: a completion ends at the first stop string or at EOS, whichever comes first, and holds nothing after
    it (no padding, no EOS after a stop string); one that met neither has max_new_tokens tokens."""
    engine = EmbeddedEngine(models / "v0")
    stops = ("1", "2", "3")
    out = engine.generate(["3142:"] * 4, 4, SamplingParams(max_new_tokens=40, stop=stops, seed=0))
    tok, eos = engine.tokenizer, engine.tokenizer.eos_token_id
    reasons = []
    for c in (c for g in out for c in g):
        ids = c.output_ids
        ends_with_stop = [k for k in range(1, len(ids) + 1) if tok.decode(ids[:k]).endswith(stops)]
        first_end = min([k for k in range(1, len(ids) + 1) if ids[k - 1] == eos] + ends_with_stop[:1] + [len(ids)])
        assert first_end == len(ids), (tok.decode(ids), "goes on after its end")
        if ends_with_stop or ids[-1] == eos:
            assert c.finish_reason == "stop" and (ids[-1] == eos) != bool(ends_with_stop), tok.decode(ids)
            reasons.append("stop string" if ends_with_stop else "eos")
        else:
            assert c.finish_reason == "length" and len(ids) == 40
        assert c.text == tok.decode(ids, skip_special_tokens=True) and len(c.output_logprobs) == len(ids)
    assert "stop string" in reasons  # the case under test happened


def test_weight_update_changes_version_and_log_probs(models):
    engine = EmbeddedEngine(models / "v0", version="v0")
    engine.update_weights(models / "v1", "v1")
    c = engine.generate(["90:"], 1, SamplingParams(max_new_tokens=6, seed=1))[0][0]
    assert c.weight_version == "v1"
    torch.testing.assert_close(torch.tensor(c.output_logprobs, dtype=torch.float64),
                               _teacher_forced(models / "v1", c, 1.0), rtol=0, atol=2e-5)


def test_bad_input_is_named(models, tmp_path):
    engine = EmbeddedEngine(models / "v0")
    with pytest.raises(ValueError, match="empty or non-string prompts at positions \\[1\\]"):
        engine.generate(["a", ""], 1, SamplingParams())
    with pytest.raises(ValueError, match="n \\(samples per prompt\\) must be an integer >= 1"):
        engine.generate(["a"], 0, SamplingParams())
    with pytest.raises(ValueError, match="top_p must lie in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="stop must be a sequence of non-empty strings"):
        SamplingParams(stop="x")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        EmbeddedEngine(tmp_path)


def test_the_model_folders_sampling_defaults_are_not_applied(models, tmp_path):
    """A generation_config.json asking for greedy decoding, a repetition penalty, min_p and suppressed tokens changes
    nothing: the call's parameters alone decide the distribution, the one the trainer's log-probs are computed
    under."""
    import json
    import shutil

    folder = tmp_path / "opinionated"
    shutil.copytree(models / "v0", folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(do_sample=False, top_k=1, repetition_penalty=3.0, min_p=0.9, suppress_tokens=list(range(100, 300)))
    (folder / "generation_config.json").write_text(json.dumps(config))
    engine = EmbeddedEngine(folder)
    (group,) = engine.generate(["3142:"], 6, SamplingParams(max_new_tokens=8, seed=0))
    assert len({tuple(c.output_ids) for c in group}) > 1  # sampled, not greedy
    for c in group:
        torch.testing.assert_close(torch.tensor(c.output_logprobs, dtype=torch.float64),
                                   _teacher_forced(folder, c, 1.0), rtol=0, atol=2e-5)
    # the same draws as plain multinomial sampling from softmax(logits) of the folder without those defaults
    import transformers

    plain = transformers.AutoModelForCausalLM.from_pretrained(models / "v0").eval()
    ids = torch.tensor([group[0].prompt_ids])
    torch.manual_seed(0)
    expected = plain.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, num_return_sequences=6,
                              max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                              pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.tokenizer.eos_token_id)
    for c, row in zip(group, expected[:, ids.shape[1]:].tolist()):
        assert c.output_ids == row[:len(c.output_ids)]


PEAK_PROBE = r"""
import json, sys, torch
from megatron_sapo.rollout import EmbeddedEngine, SamplingParams
torch.set_num_threads(1)

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

engine = EmbeddedEngine(sys.argv[1])
params = SamplingParams(max_new_tokens=int(sys.argv[2]), seed=0)
engine.generate(["3142:"], 2, SamplingParams(max_new_tokens=2, seed=0))  # allocator warm
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from now
before = rss("VmRSS:")
out = engine.generate(["3142:", "90:", "hello", "77:"], 8, params)
print(json.dumps({"extra": rss("VmHWM:") - before, "tokens": max(len(c.output_ids) for g in out for c in g)}))
"""


def test_log_probs_need_one_steps_vocab_not_all_steps(tmp_path):
    """A 151,936-token vocabulary (Qwen3's), 32 rows: asking generate for every step's logits would hold 32 x tokens x
    V floats (0.9 GB at 48 tokens, and as much again for their log-softmax); gathered per step, the peak extra memory
    of the call is a few [32, V] tensors of one step (sampling's own top-p sort and softmax among them: measured
    ~150 MB, 7.7 x [32, V] in fp32) and adds less than 3 of them (58 MB) from 12 to 48 tokens, where all steps'
    logits would add 36."""
    import json
    import os
    import subprocess
    import sys

    tiny_models().build("qwen3", tmp_path / "model", vocab_size=151_936, hidden_size=32, intermediate_size=32,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    peaks = {}
    for tokens in (12, 48):
        # a fixed mmap threshold: glibc then returns every freed large block at once, so that the peak RSS counts
        # what was alive together (its adaptive threshold would keep freed per-step blocks in the heap)
        run = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(tmp_path / "model"), str(tokens)],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
        assert run.returncode == 0, run.stderr[-3000:]
        peaks[tokens] = json.loads(run.stdout.strip().splitlines()[-1])
    assert peaks[48]["tokens"] == 48  # a random model over 151,936 ids does not sample its EOS this early
    rows_x_vocab = 32 * 151_936 * 4
    assert peaks[48]["extra"] < 12 * rows_x_vocab, peaks  # 233 MB, against 0.9 GB for all steps' logits alone
    assert peaks[48]["extra"] - peaks[12]["extra"] < 3 * rows_x_vocab, peaks
