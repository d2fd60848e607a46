"""Hugging Face config.json -> Megatron-Core TransformerConfig arguments, for the architectures we convert exactly.

Supported: Qwen3-MoE (qwen3_moe), Qwen3 (qwen3), Qwen2 (qwen2), Llama (llama). Everything that changes the numbers is
carried over: GQA (num_query_groups), head_dim (kv_channels), RoPE theta, RMSNorm epsilon, Qwen3's q/k RMSNorm,
Qwen2's QKV bias, tied embeddings, the MoE router (softmax; top-k; renormalised top-k probabilities when
norm_topk_prob, which Megatron does by applying the softmax after the top-k) and which layers are MoE
(decoder_sparse_step, mlp_only_layers). Any option that would change the numbers and is not converted is an error
that names it, never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED = ("qwen3_moe", "qwen3", "qwen2", "llama")


@dataclass(frozen=True)
class HFArchitecture:
    """What the converter needs to know of a Hugging Face model, read from its config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool
    qkv_bias: bool
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    moe_layers: tuple[bool, ...] = field(default_factory=tuple)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def active_params_per_token(self) -> int:
        """The weights one token meets in the matmuls (projections, the experts it is routed to and the dense MLPs,
        the output layer; no embeddings, norms or router): the per-token FLOPs are about twice this."""
        attention = self.hidden_size * self.head_dim * 2 * (self.num_heads + self.num_kv_heads)
        moe = {i for i, m in enumerate(self.moe_layers) if m}
        routed = self.moe_ffn_hidden_size * self.moe_topk
        mlp = sum(3 * self.hidden_size * (routed if i in moe else self.ffn_hidden_size) for i in range(self.num_layers))
        return self.num_layers * attention + mlp + self.hidden_size * self.vocab_size


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"unsupported RoPE scaling {rope_type!r} in config.json (only plain RoPE is converted)")
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json has no rope_theta")
    return float(theta)


def read_hf_config(model_dir: str | Path) -> HFArchitecture:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}: not a Hugging Face model folder")
    cfg = json.loads(path.read_text())
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; supported: {', '.join(SUPPORTED)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r} (the converted models use SwiGLU with silu)")
    if cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported")
    if model_type == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise ValueError("Llama with attention_bias or mlp_bias is not supported")
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    num_layers = cfg["num_hidden_layers"]
    arch = dict(
        model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=cfg.get("num_key_value_heads") or num_heads, head_dim=head_dim,
        ffn_hidden_size=cfg["intermediate_size"], rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg), max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"), qkv_bias=model_type == "qwen2" or bool(
            model_type == "qwen3" and cfg.get("attention_bias")), raw=cfg,
    )
    if model_type == "qwen3_moe":
        if cfg.get("attention_bias"):
            raise ValueError("Qwen3-MoE with attention_bias=true is not supported")
        step = cfg.get("decoder_sparse_step", 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        arch.update(
            num_experts=experts, moe_topk=cfg["num_experts_per_tok"], moe_ffn_hidden_size=cfg["moe_intermediate_size"],
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0)),
            moe_layers=tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers)),
        )
    return HFArchitecture(**arch)
