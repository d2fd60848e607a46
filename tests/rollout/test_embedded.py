"""The embedded engine against an independent computation: its returned log-probs equal a teacher-forced
transformers forward pass over prompt + completion (logits / temperature), for the current and updated weights."""

import pytest
import torch

from megatron_sapo.rollout import EmbeddedEngine, SamplingParams

from ..policy.harness import tiny_models

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
