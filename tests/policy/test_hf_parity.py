"""The Megatron policy is the model users think it is: per-token log-probs equal transformers' on tiny models of
every supported architecture (single process; the parallel layouts are in test_parallel_parity.py)."""

import json

import pytest
import torch

from megatron_sapo.policy import parallel
from megatron_sapo.policy.config import PolicyConfig
from megatron_sapo.policy.hf_config import read_hf_config
from megatron_sapo.policy.hf_export import export_hf
from megatron_sapo.policy.hf_weights import WeightMismatchError, load_hf_weights, read_safetensors
from megatron_sapo.policy.model import build_model, padded_vocab_size

from .harness import megatron_logits, tiny_models, token_log_probs


def _megatron(model_dir, **layout):
    arch = read_hf_config(model_dir)
    cfg = PolicyConfig(model_path=str(model_dir), **layout)
    parallel.initialize(arch, cfg)
    model = build_model(arch, cfg, pre_process=True, post_process=True).eval()
    load_hf_weights(model, arch, model_dir, padded_vocab_size(arch, cfg))
    return arch, model


@pytest.mark.parametrize("arch,tied", [("qwen3_moe", False), ("qwen3", False), ("qwen3", True), ("qwen2", False),
                                       ("llama", True)])
def test_log_probs_match_transformers(tmp_path, arch, tied):
    hf = tiny_models().build(arch, tmp_path, tie_word_embeddings=tied)
    info, model = _megatron(tmp_path)
    ids = torch.randint(0, info.vocab_size, (3, 21), generator=torch.Generator().manual_seed(1))
    ours = token_log_probs(megatron_logits(model, ids), ids, info.vocab_size)
    with torch.no_grad():
        ref = token_log_probs(hf(ids).logits, ids, info.vocab_size)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)
    assert ours.std() > 0.1  # a real distribution, not a degenerate one


def test_moe_router_without_topk_renormalisation(tmp_path):
    hf = tiny_models().build("qwen3_moe", tmp_path, norm_topk_prob=False, num_experts_per_tok=3)
    info, model = _megatron(tmp_path)
    ids = torch.randint(0, info.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = token_log_probs(hf(ids).logits, ids, info.vocab_size)
    torch.testing.assert_close(token_log_probs(megatron_logits(model, ids), ids, info.vocab_size), ref, rtol=0,
                               atol=2e-5)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "vocab_size": 10}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='mixtral'"):
        read_hf_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_hf_config(tmp_path / "nowhere")


def test_weights_of_another_model_are_rejected(tmp_path):
    tiny = tiny_models()
    tiny.build("qwen3", tmp_path / "a")
    tiny.build("qwen3", tmp_path / "b", intermediate_size=96)
    arch, model = _megatron(tmp_path / "a")
    with pytest.raises(WeightMismatchError, match="mlp.linear_fc1.weight: shape"):
        load_hf_weights(model, arch, tmp_path / "b", padded_vocab_size(arch, PolicyConfig()))


def test_a_truncated_safetensors_file_is_named(tmp_path):
    tiny_models().build("qwen3", tmp_path / "a")
    arch, model = _megatron(tmp_path / "a")
    path = tmp_path / "a" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    with pytest.raises(WeightMismatchError, match=r"model.safetensors is not a readable safetensors file \(truncated"):
        load_hf_weights(model, arch, tmp_path / "a", padded_vocab_size(arch, PolicyConfig()))


def test_layout_that_does_not_divide_the_model_is_named(tmp_path):
    tiny_models().build("qwen3_moe", tmp_path)
    arch = read_hf_config(tmp_path)
    from megatron_sapo.policy.model import check_layout

    with pytest.raises(ValueError, match="expert_model_parallel_size=3 does not divide the model's 4 experts"):
        check_layout(arch, PolicyConfig(expert_model_parallel_size=3), 3)
    with pytest.raises(ValueError, match="pipeline_model_parallel_size=3 does not divide the model's 2 layers"):
        check_layout(arch, PolicyConfig(pipeline_model_parallel_size=3), 3)
    with pytest.raises(ValueError, match="world size 3 is not a multiple of tensor x pipeline parallel = 2"):
        check_layout(arch, PolicyConfig(tensor_model_parallel_size=2), 3)


@pytest.mark.parametrize("arch,tied", [("qwen3_moe", False), ("qwen2", False), ("llama", True)])
def test_export_round_trips_exactly_and_loads_in_transformers(tmp_path, arch, tied):
    import transformers

    tiny_models().build(arch, tmp_path / "src", tie_word_embeddings=tied)
    info, model = _megatron(tmp_path / "src")
    with torch.no_grad():  # a trained model differs from its source: move every weight a little
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("replaced atomically")
    export_hf(model, info, out, tmp_path / "src", shard_bytes=64 << 10)  # several shards
    assert not (out / "stale.txt").exists() and not list(tmp_path.glob(".export.*"))
    assert (out / "config.json").read_text() == (tmp_path / "src" / "config.json").read_text()
    exported = read_safetensors(out)
    _, again = _megatron(out)
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):  # padded rows are not exported
            p, q = p[: info.vocab_size], q[: info.vocab_size]
        assert torch.equal(p, q), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, info.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = token_log_probs(hf(ids).logits, ids, info.vocab_size)
    torch.testing.assert_close(token_log_probs(megatron_logits(again, ids), ids, info.vocab_size), ref, rtol=0,
                               atol=2e-5)
    assert set(exported) == set(read_safetensors(tmp_path / "src"))


def test_transformer_engine_parameter_names_are_mapped(tmp_path):
    # TE is not installable here; its fused-norm parameter names must still map to the HF norms
    from megatron_sapo.policy.hf_weights import Layout, rule_for

    tiny_models().build("qwen3", tmp_path)
    arch, model = _megatron(tmp_path)
    lay = Layout(arch, model.config)
    assert rule_for("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", arch, lay).keys == [
        "model.layers.1.input_layernorm.weight"]
    assert rule_for("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", arch, lay).keys == [
        "model.layers.0.post_attention_layernorm.weight"]
