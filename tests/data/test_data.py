import json

import pytest
import torch

from megatron_sapo.data import (
    DataConfig,
    MalformedRowError,
    PromptSampler,
    fill_groups,
    informative_groups,
    load_prompts,
    render_prompt,
    sort_digits_examples,
    write_jsonl,
)

ROWS = [
    {"prompt": "What is 2+2?", "answer": 4, "level": 1},
    "just a string",
    {"prompt": "", "answer": "x"},
    {"question": "wrong key", "answer": "1"},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "answer": "hello"},
    {"prompt": [{"role": "user"}], "answer": "a"},
    {"prompt": "no answer"},
    {"prompt": "Name a prime.", "answer": "7"},
]


def _jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(3, "{not json")
    lines.insert(5, "")  # blank lines are not rows
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_malformed_rows_are_skipped_and_counted(tmp_path):
    records, report = load_prompts([_jsonl(tmp_path)], DataConfig())
    assert [r.answer for r in records] == ["4", "hello", "7"]
    assert records[0].extra == {"level": 1} and records[0].source.endswith("prompts.jsonl:1")
    assert records[1].prompt[0] == {"role": "system", "content": "be brief"}
    assert report.rows == 9 and report.kept == 3 and report.malformed == 6
    assert any("prompts.jsonl:4: not valid JSON" in e for e in report.examples)


def test_malformed_row_is_an_error_with_file_and_line_when_configured(tmp_path):
    with pytest.raises(MalformedRowError, match=r"prompts.jsonl:2: a row must be an object, got str"):
        load_prompts([_jsonl(tmp_path)], DataConfig(on_malformed="error"))


def test_parquet_gives_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a?", "answer": "1"}, {"prompt": None, "answer": "2"}, {"prompt": "c?", "answer": "3"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    records, report = load_prompts([tmp_path / "p.parquet"], DataConfig())
    assert [(r.prompt, r.answer) for r in records] == [("a?", "1"), ("c?", "3")]
    assert report.malformed == 1 and records[1].source.endswith("p.parquet:3")


@pytest.mark.parametrize("name,content,message", [
    ("p.csv", "prompt,answer\n", "unsupported prompt file type '.csv'"),
    ("p.jsonl", "{\"prompt\": \"\", \"answer\": 1}\n", "no usable prompts .* \\(1 malformed rows\\)"),
])
def test_bad_files_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompts([tmp_path / name], DataConfig())
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_prompts([tmp_path / "missing.jsonl"], DataConfig())


def test_sampler_is_deterministic_covers_each_epoch_and_resumes(tmp_path):
    records, _ = load_prompts([write_jsonl(sort_digits_examples(10, seed=1), tmp_path / "s.jsonl")], DataConfig())
    a, b = PromptSampler(records, seed=3), PromptSampler(records, seed=3)
    first = a.take(10)
    assert first == b.take(10) and sorted(r.source for r in first) == sorted(r.source for r in records)
    second = a.take(10)
    assert second != first and sorted(r.source for r in second) == sorted(r.source for r in records)
    assert PromptSampler(records, seed=4).take(10) != first
    state = a.state_dict()
    expected = a.take(7)
    resumed = PromptSampler(records, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(7) == expected
    with pytest.raises(ValueError, match="the data or its seed changed"):
        PromptSampler(records[:5], seed=3).load_state_dict(state)
    assert PromptSampler(records, shuffle=False).take(3) == records[:3]


def test_chat_template_and_raw_prompts():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    record = load_record("Sort 31:")
    assert render_prompt(record, tokenizer, system_prompt="think") == "<system>think<user>Sort 31:<assistant>"
    assert render_prompt(record, tokenizer, apply_chat_template=False) == "Sort 31:"
    assert render_prompt(record, None, system_prompt="think") == "think\nSort 31:"


def load_record(prompt):
    from megatron_sapo.data import PromptRecord

    return PromptRecord(prompt, "13", "test:1")


def test_informative_groups_and_fill():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.2]])
    assert informative_groups(rewards).tolist() == [False, True, False, True]
    calls = []

    def draw(n):  # every other group is constant
        start = sum(calls)
        calls.append(n)
        groups = list(range(start, start + n))
        return groups, torch.tensor([[1.0, 1.0] if g % 2 else [0.0, 1.0] for g in groups])

    kept, kept_rewards, stats = fill_groups(draw, target=4, max_rounds=5)
    assert kept == [0, 2, 4, 6] and calls == [4, 2, 1] and kept_rewards.shape == (4, 2)
    assert stats["dynamic_sampling/dropped_groups"] == 3 and stats["dynamic_sampling/rounds"] == 3
    calls.clear()
    kept, _, stats = fill_groups(draw, target=4, max_rounds=1)
    assert len(kept) == 2 and stats["dynamic_sampling/kept_groups"] == 2


def test_synthetic_sort_task_is_deterministic_and_correct(tmp_path):
    rows = sort_digits_examples(50, seed=7)
    assert rows == sort_digits_examples(50, seed=7) and rows != sort_digits_examples(50, seed=8)
    assert all(r["answer"] == "".join(sorted(r["prompt"][:-1])) and len(r["answer"]) == 4 for r in rows)
    records, report = load_prompts([write_jsonl(rows, tmp_path / "d" / "sort.jsonl")], DataConfig())
    assert report.kept == 50 and not list((tmp_path / "d").glob(".*tmp"))


@pytest.mark.parametrize("options,message", [
    ({"on_malformed": "warn"}, "unknown data.on_malformed 'warn'"),
    ({"samples_per_prompt": 0}, "data.samples_per_prompt must be an integer >= 1"),
    ({"dynamic_sampling": True, "samples_per_prompt": 1}, "needs data.samples_per_prompt >= 2"),
])
def test_config_errors_name_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**options)
