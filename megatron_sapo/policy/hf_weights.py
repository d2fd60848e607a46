"""Hugging Face safetensors <-> this rank's Megatron-Core parameters, for any TP / PP / EP layout.

Each Megatron parameter of the local layer spec is derived from named HF tensors by a Rule (`rule_for`), applied by
`shard` on load and inverted by `unshard` on export:
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
from typing import NamedTuple

import torch

from .hf_config import HFArchitecture


class WeightMismatchError(ValueError):
    """The HF weights do not fit the Megatron model (missing, unused or mis-shaped tensors)."""


class SafetensorsFolder:
    """The tensors of a HF folder (one model.safetensors, or shards listed by model.safetensors.index.json), read
    lazily: the names come from the files' headers, a tensor is read only when it is asked for, so a rank reads only
    the tensors it owns. safetensors maps the files: a tensor it returns is backed by file pages (page cache, shared by
    the ranks of a node and reclaimable), not by a private copy. Use as a context manager (the files stay open
    inside)."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
        self._files, self._where = [], {}
        for name in files:
            path = model_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in the index but missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors' own error type: a header it cannot read, a file cut short
                raise WeightMismatchError(f"{path} is not a readable safetensors file (truncated or damaged?): "
                                          f"{err}") from None
            self._files.append(handle)
            self._where.update({key: handle for key in handle.keys()})

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc_info) -> None:
        self._files, self._where = [], {}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def read_safetensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder (single file or sharded with model.safetensors.index.json), in memory."""
    with SafetensorsFolder(model_dir) as folder:
        return {name: folder[name] for name in folder.keys()}


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


class Rule(NamedTuple):
    """How one Megatron parameter relates to HF tensors: `keys` -> this rank's value by `kind`, split over `group`
    ("tp", "etp" or None for a replicated parameter)."""

    keys: list[str]
    kind: str  # "copy", "vocab", "split0", "split1", "qkv", "fc1"
    group: str | None


def rule_for(name: str, arch: HFArchitecture, lay: Layout) -> Rule | None:
    """The Rule of one Megatron parameter name on this rank, or None if the name is not a converted weight."""
    if name == "embedding.word_embeddings.weight":
        return Rule(["model.embed_tokens.weight"], "vocab", "tp")
    if name == "output_layer.weight":
        return Rule(["model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"], "vocab", "tp")
    if name == "decoder.final_layernorm.weight":
        return Rule(["model.norm.weight"], "copy", None)
    match = _LAYER.match(name)
    if not match:
        return None
    layer, rest = lay.layer_offset + int(match.group(1)), match.group(2)
    hf = f"model.layers.{layer}."
    attn = hf + "self_attn."
    simple = {
        "input_layernorm.weight": Rule([hf + "input_layernorm.weight"], "copy", None),
        "pre_mlp_layernorm.weight": Rule([hf + "post_attention_layernorm.weight"], "copy", None),
        # TransformerEngine's spec fuses these norms into the following linear layer
        "self_attention.linear_qkv.layer_norm_weight": Rule([hf + "input_layernorm.weight"], "copy", None),
        "mlp.linear_fc1.layer_norm_weight": Rule([hf + "post_attention_layernorm.weight"], "copy", None),
        "self_attention.q_layernorm.weight": Rule([attn + "q_norm.weight"], "copy", None),
        "self_attention.k_layernorm.weight": Rule([attn + "k_norm.weight"], "copy", None),
        "self_attention.linear_proj.weight": Rule([attn + "o_proj.weight"], "split1", "tp"),
        "mlp.linear_fc2.weight": Rule([hf + "mlp.down_proj.weight"], "split1", "tp"),
        "mlp.linear_fc1.weight": Rule([hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"], "fc1", "tp"),
        "mlp.router.weight": Rule([hf + "mlp.gate.weight"], "copy", None),
        "self_attention.linear_qkv.weight": Rule([f"{attn}{p}_proj.weight" for p in "qkv"], "qkv", "tp"),
        "self_attention.linear_qkv.bias": Rule([f"{attn}{p}_proj.bias" for p in "qkv"], "qkv", "tp"),
    }
    if rest in simple:
        return simple[rest]
    match = _EXPERT.match(rest)
    if match:
        prefix = f"{hf}mlp.experts.{lay.ep_rank * lay.experts_per_rank + int(match.group(1))}."
        if match.group(2) == "linear_fc1":
            return Rule([prefix + "gate_proj.weight", prefix + "up_proj.weight"], "fc1", "etp")
        return Rule([prefix + "down_proj.weight"], "split1", "etp")
    return None


def shard(rule: Rule, tensors: list[torch.Tensor], arch: HFArchitecture, lay: Layout, padded_vocab: int):
    """This rank's value of a parameter from its HF tensors."""
    parts, rank = (lay.tp, lay.tp_rank) if rule.group == "tp" else (lay.etp, lay.etp_rank)
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "vocab":
        return _vocab_rows(tensors[0], padded_vocab, parts, rank)
    if rule.kind in ("split0", "split1"):
        return _split(tensors[0], parts, rank, int(rule.kind[-1]))
    if rule.kind == "qkv":
        return _qkv(arch, *tensors, parts, rank)
    gate, up = tensors
    return torch.cat([_split(gate, parts, rank, 0), _split(up, parts, rank, 0)])


def unshard(rule: Rule, pieces: list[torch.Tensor], arch: HFArchitecture) -> list[torch.Tensor]:
    """The HF tensors of a parameter from its pieces on every rank of its group, in rank order (inverse of shard)."""
    if rule.kind == "copy":
        return [pieces[0]]
    if rule.kind == "vocab":
        return [torch.cat(pieces)[: arch.vocab_size]]
    if rule.kind in ("split0", "split1"):
        return [torch.cat(pieces, dim=int(rule.kind[-1]))]
    if rule.kind == "fc1":
        halves = [p.chunk(2) for p in pieces]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    hd, groups = arch.head_dim, arch.num_kv_heads
    per_group = arch.num_heads // groups
    full = torch.cat(pieces)
    rest = full.shape[1:]
    full = full.reshape(groups, (per_group + 2) * hd, *rest)
    q, k, v = full.split([per_group * hd, hd, hd], dim=1)
    return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


def _megatron_params(model) -> dict[str, torch.Tensor]:
    """Parameter tensors by state-dict name (extra states, like rotary buffers, are not weights)."""
    return {name: p for name, p in model.named_parameters()}


@torch.no_grad()
def load_hf_weights(model, arch: HFArchitecture, model_dir: str | Path, padded_vocab: int) -> None:
    """Fill this rank's model from the HF folder; WeightMismatchError on anything that does not fit exactly.
    Each rank reads only the HF tensors of its own parameters, one parameter at a time. Memory: the tensors are
    mapped file pages (shared page cache); the private (anonymous) memory a load adds is one parameter's shard being
    built (a padded vocabulary, a fused qkv), whatever the model's size."""
    with SafetensorsFolder(model_dir) as tensors:
        _load(model, arch, tensors, model_dir, padded_vocab)


def _load(model, arch: HFArchitecture, tensors: SafetensorsFolder, model_dir, padded_vocab: int) -> None:
    lay = Layout(arch, model.config)
    problems: list[str] = []
    for name, param in _megatron_params(model).items():
        rule = rule_for(name, arch, lay)
        if rule is None:
            problems.append(f"no HF source known for Megatron parameter {name}")
            continue
        missing = [k for k in rule.keys if k not in tensors]
        if missing:
            problems.append(f"{name}: HF tensor(s) missing: {', '.join(missing)}")
            continue
        value = shard(rule, [tensors[k] for k in rule.keys], arch, lay, padded_vocab)
        if tuple(value.shape) != tuple(param.shape):
            problems.append(f"{name}: shape {tuple(value.shape)} from {rule.keys[0]} does not fit "
                            f"{tuple(param.shape)}")
            continue
        param.copy_(value.to(param.dtype))
    unexpected = sorted(set(tensors.keys()) - set(hf_keys(arch)))
    if unexpected:
        problems.append(f"tensors this {arch.model_type} model does not have: {', '.join(unexpected[:5])}")
    if problems:
        raise WeightMismatchError(f"{model_dir} does not fit this {arch.model_type} model:\n  " +
                                  "\n  ".join(problems[:10]) + (f"\n  ... {len(problems) - 10} more"
                                                                if len(problems) > 10 else ""))


def hf_keys(arch: HFArchitecture) -> list[str]:
    """Every tensor name of the HF checkpoint of `arch`."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not arch.tie_word_embeddings:
        keys.append("lm_head.weight")
    for layer in range(arch.num_layers):
        hf = f"model.layers.{layer}."
        keys += [hf + "input_layernorm.weight", hf + "post_attention_layernorm.weight"]
        keys += [f"{hf}self_attn.{p}_proj.weight" for p in "qkvo"]
        if arch.qkv_bias:
            keys += [f"{hf}self_attn.{p}_proj.bias" for p in "qkv"]
        if arch.qk_norm:
            keys += [hf + "self_attn.q_norm.weight", hf + "self_attn.k_norm.weight"]
        if arch.is_moe and arch.moe_layers[layer]:
            keys.append(hf + "mlp.gate.weight")
            keys += [f"{hf}mlp.experts.{e}.{p}_proj.weight" for e in range(arch.num_experts)
                     for p in ("gate", "up", "down")]
        else:
            keys += [f"{hf}mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    return keys
