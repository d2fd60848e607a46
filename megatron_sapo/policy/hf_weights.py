"""Hugging Face safetensors <-> this rank's Megatron-Core parameters, for any TP / PP / EP layout.

Each Megatron parameter of the local layer spec is derived from named HF tensors by a small rule (`_rule`):
  embedding.word_embeddings / output_layer    vocab rows split over TP (padded rows zero)
  linear_qkv                                  q, k, v interleaved per query group, groups split over TP
  linear_proj, linear_fc2                     split over TP along the input dimension
  linear_fc1                                  [gate; up], each split over TP along the output dimension
  local_experts.j                             global expert ep_rank * experts_per_rank + j, split over expert TP
  norms, router                               replicated
Loading checks every shape and reports any Megatron parameter it cannot fill or any HF tensor it did not use, so a
checkpoint of another model never loads partially.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .hf_config import HFArchitecture


class WeightMismatchError(ValueError):
    """The HF weights do not fit the Megatron model (missing, unused or mis-shaped tensors)."""


def read_safetensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder (single file or sharded with model.safetensors.index.json)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in the index but missing")
        tensors.update(load_file(str(path)))
    return tensors


class Layout:
    """This rank's coordinates in the parallel layout, read from megatron.core.parallel_state."""

    def __init__(self, arch: HFArchitecture, config):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        self.tp, self.tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.ep, self.ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        self.etp = ps.get_expert_tensor_parallel_world_size()
        self.etp_rank = ps.get_expert_tensor_parallel_rank()
        self.layer_offset = get_transformer_layer_offset(config)
        self.experts_per_rank = arch.num_experts // self.ep if arch.is_moe else 0


def _split(t: torch.Tensor, parts: int, rank: int, dim: int) -> torch.Tensor:
    return t.chunk(parts, dim=dim)[rank]


def _qkv(arch: HFArchitecture, q, k, v, parts: int, rank: int) -> torch.Tensor:
    """[q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...] for this rank's query groups."""
    hd, groups = arch.head_dim, arch.num_kv_heads
    per_group = arch.num_heads // groups
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * hd, *rest)
    k, v = k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)
    fused = torch.cat([q, k, v], dim=1)
    return _split(fused, parts, rank, 0).reshape(-1, *rest)


def _vocab_rows(t: torch.Tensor, padded: int, parts: int, rank: int) -> torch.Tensor:
    full = t.new_zeros(padded, *t.shape[1:])
    full[: t.shape[0]] = t
    return _split(full, parts, rank, 0)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")


def _rule(name: str, arch: HFArchitecture, lay: Layout, padded_vocab: int):
    """(HF keys used, function of those tensors giving this rank's value) for one Megatron parameter name."""
    tp, r = lay.tp, lay.tp_rank
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"], lambda t: _vocab_rows(t, padded_vocab, tp, r)
    if name == "output_layer.weight":
        key = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return [key], lambda t: _vocab_rows(t, padded_vocab, tp, r)
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"], lambda t: t
    match = _LAYER.match(name)
    if not match:
        return None
    layer, rest = lay.layer_offset + int(match.group(1)), match.group(2)
    hf = f"model.layers.{layer}."
    attn = hf + "self_attn."
    simple = {
        "input_layernorm.weight": (hf + "input_layernorm.weight", None),
        "pre_mlp_layernorm.weight": (hf + "post_attention_layernorm.weight", None),
        "self_attention.q_layernorm.weight": (attn + "q_norm.weight", None),
        "self_attention.k_layernorm.weight": (attn + "k_norm.weight", None),
        "self_attention.linear_proj.weight": (attn + "o_proj.weight", 1),
        "mlp.linear_fc2.weight": (hf + "mlp.down_proj.weight", 1),
        "mlp.router.weight": (hf + "mlp.gate.weight", None),
    }
    if rest in simple:
        key, dim = simple[rest]
        return [key], (lambda t: t) if dim is None else (lambda t: _split(t, tp, r, dim))
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        keys = [f"{attn}{p}_proj.{kind}" for p in "qkv"]
        return keys, lambda q, k, v: _qkv(arch, q, k, v, tp, r)
    if rest == "mlp.linear_fc1.weight":
        return [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"], \
            lambda g, u: torch.cat([_split(g, tp, r, 0), _split(u, tp, r, 0)])
    match = _EXPERT.match(rest)
    if match:
        expert = lay.ep_rank * lay.experts_per_rank + int(match.group(1))
        prefix = f"{hf}mlp.experts.{expert}."
        etp, er = lay.etp, lay.etp_rank
        if match.group(2) == "linear_fc1":
            return [prefix + "gate_proj.weight", prefix + "up_proj.weight"], \
                lambda g, u: torch.cat([_split(g, etp, er, 0), _split(u, etp, er, 0)])
        return [prefix + "down_proj.weight"], lambda d: _split(d, etp, er, 1)
    return None


def _megatron_params(model) -> dict[str, torch.Tensor]:
    """Parameter tensors by state-dict name (extra states, like rotary buffers, are not weights)."""
    return {name: p for name, p in model.named_parameters()}


@torch.no_grad()
def load_hf_weights(model, arch: HFArchitecture, model_dir: str | Path, padded_vocab: int) -> None:
    """Fill this rank's model from the HF folder; WeightMismatchError on anything that does not fit exactly."""
    tensors = read_safetensors(model_dir)
    lay = Layout(arch, model.config)
    used: set[str] = set()
    problems: list[str] = []
    for name, param in _megatron_params(model).items():
        rule = _rule(name, arch, lay, padded_vocab)
        if rule is None:
            problems.append(f"no HF source known for Megatron parameter {name}")
            continue
        keys, build = rule
        missing = [k for k in keys if k not in tensors]
        if missing:
            problems.append(f"{name}: HF tensor(s) missing: {', '.join(missing)}")
            continue
        value = build(*(tensors[k] for k in keys))
        if tuple(value.shape) != tuple(param.shape):
            problems.append(f"{name}: shape {tuple(value.shape)} from {keys[0]} does not fit {tuple(param.shape)}")
            continue
        param.copy_(value.to(param.dtype))
        used.update(keys)
    if problems:
        raise WeightMismatchError(f"{model_dir} does not fit this {arch.model_type} model:\n  " +
                                  "\n  ".join(problems[:10]) + (f"\n  ... {len(problems) - 10} more"
                                                                if len(problems) > 10 else ""))
    _check_unused(tensors, used, arch, lay)


def _check_unused(tensors: dict, used: set[str], arch: HFArchitecture, lay: Layout) -> None:
    """Every HF tensor must be used by some rank; a single rank can only check the ones of its own layers/experts."""
    if lay.tp * lay.ep > 1 or arch.num_layers != _count_local_layers(tensors, used):
        return
    unused = sorted(k for k in tensors if k not in used and "rotary_emb" not in k)
    if unused:
        raise WeightMismatchError(f"HF tensors not used by the model: {', '.join(unused[:10])}")


def _count_local_layers(tensors: dict, used: set[str]) -> int:
    return len({k.split(".")[2] for k in used if k.startswith("model.layers.")})
