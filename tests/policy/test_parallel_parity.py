"""TP=2, EP=2, PP=2 and TP=2 + EP=2 on 2 gloo processes: the policy's log-probs equal transformers' (tiny Qwen3-MoE),
and exporting from each layout gives back the source checkpoint bit for bit. With TP the logits never exist whole:
the log-probs come from the fused output-layer op over the tensor-parallel group (odd sequence length: the
sequence-parallel padding is exercised too)."""

import os

import pytest
import torch

from megatron_sapo.policy.parallel import spawn_local

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
LAYOUTS = [dict(tensor_model_parallel_size=2), dict(expert_model_parallel_size=2),
           dict(pipeline_model_parallel_size=2),
           dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1)]


def _worker(rank, model_dir):
    import transformers

    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.hf_config import read_hf_config
    from megatron_sapo.policy.hf_weights import read_safetensors
    from megatron_sapo.policy.policy import Policy

    from .harness import token_log_probs

    arch = read_hf_config(model_dir)
    ids = torch.randint(0, arch.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ref = token_log_probs(hf(ids).logits, ids, arch.vocab_size)
    source = read_safetensors(model_dir)
    for layout in LAYOUTS:
        policy = Policy(PolicyConfig(model_path=model_dir, **layout))
        err = (policy.log_probs(ids).double() - ref).abs().max().item()
        assert err < 2e-5, (layout, err)
        out = os.path.join(model_dir, "..", "export-" + "-".join(f"{k[:2]}{v}" for k, v in layout.items()))
        policy.export_hf(out)
        if rank == 0:
            exported = read_safetensors(out)
            assert set(source) == set(exported), layout
            for key, tensor in source.items():
                assert torch.equal(tensor, exported[key]), (layout, key)


def test_parallel_layouts_match_transformers_and_export_exactly(tmp_path):
    from .harness import tiny_models

    tiny_models().build("qwen3_moe", tmp_path / "src")
    spawn_local(_worker, 2, str(tmp_path / "src"))
