"""TP=2, EP=2 and PP=2 on 2 gloo processes reproduce transformers' per-token log-probs (tiny Qwen3-MoE). With TP the
logits stay vocab-sharded: the log-probs come from megatron_sapo.ops.fused_logprobs over the TP group."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
LAYOUTS = [dict(tensor_model_parallel_size=2), dict(expert_model_parallel_size=2),
           dict(pipeline_model_parallel_size=2), dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1)]


def _log_probs_on_rank(model, ids, vocab, padded_vocab):
    """This layout's log-probs, on every rank (PP: through Megatron's schedule, broadcast from the last stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sapo.ops import fused_logprobs
    from megatron_sapo.policy.cpu_compat import cuda_as_cpu

    from .harness import causal_mask

    b, s = ids.shape
    positions = torch.arange(s)[None].expand(b, s)
    store = {}

    def forward_step(_iterator, m):
        out = m(ids, positions, causal_mask(s))

        def collect(output):
            store["logits"] = output.detach()
            return output.sum() * 0, {}
        return out, collect

    with torch.no_grad(), cuda_as_cpu():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                    num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    logp = torch.zeros(b, s - 1)
    if ps.is_pipeline_last_stage():
        logits = store["logits"]  # [b, s, padded_vocab / tp], this rank's vocab shard
        tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        shard = padded_vocab // tp
        logits = logits[:, :-1].float().contiguous()
        # the padded rows of the last shard never score: -inf, which the fused op supports
        valid = min(shard, max(0, vocab - tp_rank * shard))
        logits[..., valid:] = float("-inf")
        logp = fused_logprobs(logits, ids[:, 1:], process_group=ps.get_tensor_model_parallel_group(),
                              vocab_start=tp_rank * shard)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(logp, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return logp.double()


def _worker(rank, port, model_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    import transformers

    from megatron_sapo.policy import parallel
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.hf_config import read_hf_config
    from megatron_sapo.policy.hf_weights import export_hf, load_hf_weights, read_safetensors
    from megatron_sapo.policy.model import build_model, padded_vocab_size

    from .harness import token_log_probs

    arch = read_hf_config(model_dir)
    ids = torch.randint(0, arch.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ref = token_log_probs(hf(ids).logits, ids, arch.vocab_size)
    try:
        for layout in LAYOUTS:
            cfg = PolicyConfig(model_path=model_dir, **layout)
            parallel.initialize(arch, cfg)
            from megatron.core import parallel_state as ps

            model = build_model(arch, cfg, pre_process=ps.is_pipeline_first_stage(),
                                post_process=ps.is_pipeline_last_stage()).eval()
            load_hf_weights(model, arch, model_dir, padded_vocab_size(arch, cfg))
            ours = _log_probs_on_rank(model, ids, arch.vocab_size, padded_vocab_size(arch, cfg))
            err = (ours - ref).abs().max().item()
            assert err < 2e-5, (layout, err)
            # export from this layout gives back the source tensors bit for bit
            out = os.path.join(model_dir, "..", f"export-{'-'.join(f'{k[:2]}{v}' for k, v in layout.items())}")
            export_hf(model, arch, out, model_dir)
            if rank == 0:
                source, exported = read_safetensors(model_dir), read_safetensors(out)
                assert set(source) == set(exported), layout
                for key, tensor in source.items():
                    assert torch.equal(tensor, exported[key]), (layout, key)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parallel_layouts_match_transformers(tmp_path):
    from .harness import tiny_models

    tiny_models().build("qwen3_moe", tmp_path / "src")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "src")), nprocs=2, join=True)
