"""Build the Megatron-Core GPTModel of a Hugging Face architecture for this rank's part of the TP/PP/EP layout.

Megatron's local layer spec by default (it runs everywhere); the TransformerEngine spec when TE is importable and
CUDA is present. Parallel sizes that do not divide the model get an error that names both numbers.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import cpu_compat
from .config import PolicyConfig
from .hf_config import HFArchitecture

log = logging.getLogger("megatron_sapo.policy")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_layout(arch: HFArchitecture, cfg: PolicyConfig, world_size: int) -> None:
    tp, pp, ep = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.expert_model_parallel_size
    checks = [
        (arch.num_heads, tp, "attention heads", "tensor_model_parallel_size"),
        (arch.num_kv_heads, tp, "key/value heads", "tensor_model_parallel_size"),
        (arch.ffn_hidden_size, tp, "intermediate_size", "tensor_model_parallel_size"),
        (arch.num_layers, pp, "layers", "pipeline_model_parallel_size"),
    ]
    etp = cfg.expert_tensor_parallel
    if arch.is_moe:
        checks += [(arch.num_experts, ep, "experts", "expert_model_parallel_size"),
                   (arch.moe_ffn_hidden_size, etp, "moe_intermediate_size", "expert_tensor_parallel_size")]
    elif ep > 1:
        raise ValueError(f"expert_model_parallel_size={ep} needs a MoE model; {arch.model_type} has no experts")
    for total, size, what, name in checks:
        if total % size:
            raise ValueError(f"{name}={size} does not divide the model's {total} {what}")
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of tensor x pipeline parallel = {tp * pp}")
    if (world_size // pp) % (ep * etp):
        raise ValueError(f"world size / pipeline parallel = {world_size // pp} is not a multiple of "
                         f"expert_model_parallel_size x expert_tensor_parallel_size = {ep * etp}")


def padded_vocab_size(arch: HFArchitecture, cfg: PolicyConfig) -> int:
    """Megatron shards the vocab evenly over TP: pad to a multiple of 128 * TP (the padded rows never score), or,
    for a vocab so small that this would leave the last TP rank only padded rows (98 tokens at TP=2 would pad to
    256, rows 128-255 on rank 1), to the nearest multiple of TP, so that every rank holds real rows."""
    tp = cfg.tensor_model_parallel_size
    for multiple in (128 * tp, tp):
        padded = -(-arch.vocab_size // multiple) * multiple
        if (tp - 1) * (padded // tp) < arch.vocab_size:
            return padded
    raise ValueError(f"vocab of {arch.vocab_size} tokens cannot be split over {tp} tensor-parallel ranks")


def transformer_config(arch: HFArchitecture, cfg: PolicyConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = cpu_compat.enable()
    if on_cpu and arch.is_moe and cfg.moe_token_dispatcher != "allgather":
        # Megatron 0.16.1's alltoall dispatcher passes split sizes as tensors and needs CUDA streams
        log.warning("policy.moe_token_dispatcher=%s runs as allgather without CUDA", cfg.moe_token_dispatcher)
    dtype = _DTYPES[cfg.params_dtype]
    moe = {}
    if arch.is_moe:
        coeff = arch.router_aux_loss_coef if cfg.moe_aux_loss_coeff is None else cfg.moe_aux_loss_coeff
        moe = dict(
            num_moe_experts=arch.num_experts, moe_router_topk=arch.moe_topk,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            # softmax after the top-k renormalises the top-k probabilities (norm_topk_prob); before it, it does not
            moe_router_pre_softmax=not arch.norm_topk_prob,
            moe_router_load_balancing_type="aux_loss" if coeff > 0 else "none", moe_aux_loss_coeff=coeff,
            moe_token_dispatcher_type="allgather" if on_cpu else cfg.moe_token_dispatcher,
            moe_grouped_gemm=False, moe_layer_freq=[int(x) for x in arch.moe_layers],
            moe_router_dtype="fp32", moe_enable_routing_replay=cfg.routing_replay != "none",
        )
    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, qk_layernorm=arch.qk_norm,
        add_bias_linear=False, add_qkv_bias=arch.qkv_bias, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        # Megatron requires it for MoE with TP in training; sequences are padded to a multiple of TP for it
        sequence_parallel=cfg.tensor_model_parallel_size > 1,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=cfg.expert_tensor_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu, batch_p2p_comm=not on_cpu,
        **_recompute(cfg, arch), **moe,
    )


def _recompute(cfg: PolicyConfig, arch: HFArchitecture) -> dict:
    """policy.recompute as Megatron-Core's fields (its own checkpointing of layers or modules)."""
    if cfg.recompute == "none":
        return {}
    if cfg.recompute == "selective":
        if "layernorm" in cfg.recompute_modules and not cpu_compat.uses_transformer_engine():
            # Megatron-Core 0.16.1 checkpoints the norms through TE's FP8 state (a NameError without it)
            raise ValueError("policy.recompute_modules: 'layernorm' needs TransformerEngine (Megatron-Core "
                             "recomputes the norms through it), which is not in use here")
        return dict(recompute_granularity="selective", recompute_modules=list(cfg.recompute_modules))
    if cfg.recompute_num_layers > arch.num_layers:
        raise ValueError(f"policy.recompute_num_layers={cfg.recompute_num_layers} exceeds the model's "
                         f"{arch.num_layers} layers")
    return dict(recompute_granularity="full", recompute_method=cfg.recompute_method,
                recompute_num_layers=cfg.recompute_num_layers)


def layer_spec(arch: HFArchitecture, config):
    from megatron.core.models.gpt import gpt_layer_specs

    from .packing import use_packed_attention

    use_te = cpu_compat.uses_transformer_engine()
    if arch.is_moe:  # per-layer specs: MoE and dense layers as moe_layer_freq says, sliced to this pipeline stage
        spec = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                                          normalization="RMSNorm")
    elif use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    if not use_te:  # the local attention, also for packed sequences (TE's takes them itself)
        use_packed_attention(spec)
    return spec


def build_model(arch: HFArchitecture, cfg: PolicyConfig, *, pre_process: bool, post_process: bool):
    """This rank's GPTModel (its pipeline stage, its tensor and expert shards)."""
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, cfg)
    return GPTModel(
        config=config, transformer_layer_spec=layer_spec(arch, config),
        vocab_size=padded_vocab_size(arch, cfg), max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings, position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
    )
