"""Packed sequences in Megatron-Core: the THD inputs of a packed micro-batch, and a core attention for the local
(non-TransformerEngine) layer spec that takes them.

With TransformerEngine the model's TEDotProductAttention takes THD inputs itself. Megatron-Core 0.16.1's local
DotProductAttention refuses them, so the local spec gets `PackedDotProductAttention`: the same attention, which
for a packed micro-batch attends within each row only (its `cu_seqlens` boundaries):
  - on CUDA, where PyTorch has it (torch.nn.attention.varlen, 2.10+), variable-length flash attention over the
    whole packed row in one call (never run on a GPU in this project's tests yet: `make gpu-check` compares a
    packed step through it with the padded one);
  - otherwise (the CPU; GPUs with an older torch), the parent's attention over blocks of consecutive rows (up to
    128 tokens, or one longer row), each with a mask causal within each row and shut across rows: exact, and its
    cost near the rows' own (sum of L_i^2) rather than the packed row's (T^2), without a call per short row.
Without packing it is the parent unchanged. RoPE restarts at every row through Megatron-Core's own THD rotary path
(`cu_seqlens` in PackedSeqParams).
"""

from __future__ import annotations

import functools
import inspect

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from ..batching.packing import cu_seqlens


def packed_inputs(micro_batch, length: int, device) -> tuple[PackedSeqParams, torch.Tensor]:
    """THD parameters of a packed micro-batch computed at `length` positions (its length rounded up for tensor
    parallelism; the rest a padding sequence of its own), and its [1, length] positions, restarting at every sequence
    (for position embeddings that read them; RoPE reads the boundaries). Built on the CPU: no device sync."""
    cu = cu_seqlens(micro_batch, length)
    sizes = (cu[1:] - cu[:-1]).tolist()
    positions = torch.cat([torch.arange(n) for n in sizes])[None].to(device)
    cu = cu.to(device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(sizes),
                             max_seqlen_kv=max(sizes))
    return params, positions


@functools.cache
def _varlen():
    """PyTorch's variable-length attention and how it is told to be causal, or None where it is missing (looked up
    once: every attention layer asks)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    names = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in names else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in names


BLOCK = 128  # tokens: short rows are attended together in blocks of at most this size (one call, a masked square)


@functools.lru_cache(maxsize=1)  # every layer of a micro-batch attends over the same blocks: built once for it
def _blocks(bounds: tuple[int, ...], device) -> tuple:
    """(start, end, mask) over consecutive rows grouped into blocks of at most BLOCK tokens (or one longer row): each
    block's mask [1, 1, n, n] is causal within each of its rows and shut across them (True = masked). A block of
    short rows costs one call of n^2 scores instead of a call per row; a long row is a block of its own."""
    return tuple(_each_block(bounds, device))


def _each_block(bounds: tuple[int, ...], device):
    start = 0
    while start < len(bounds) - 1:
        end = start + 1
        while end < len(bounds) - 1 and bounds[end + 1] - bounds[start] <= BLOCK:
            end += 1
        lo, hi = bounds[start], bounds[end]
        row = torch.repeat_interleave(torch.arange(end - start), torch.tensor(bounds[start + 1:end + 1]) -
                                      torch.tensor(bounds[start:end]))
        mask = (row[:, None] != row[None, :]) | torch.ones(hi - lo, hi - lo, dtype=torch.bool).triu(1)
        yield lo, hi, mask[None, None].to(device)
        start = end


class PackedDotProductAttention(DotProductAttention):
    """Megatron-Core's local core attention, also for THD inputs (packed rows); see the module docstring."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSeqParams | None = None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences in {packed_seq_params.qkv_format!r} layout; only 'thd' is supported")
        cu = packed_seq_params.cu_seqlens_q
        varlen = _varlen() if query.is_cuda else None
        if varlen is not None:
            return self._varlen_forward(query, key, value, cu, packed_seq_params.max_seqlen_q, *varlen)
        out = []
        for start, end, mask in _blocks(tuple(cu.tolist()), query.device):
            out.append(super().forward(query[start:end, None], key[start:end, None], value[start:end, None],
                                       mask, attn_mask_type=attn_mask_type, attention_bias=attention_bias))
        return torch.cat(out)  # [t, 1, heads x head_dim]

    def _varlen_forward(self, query, key, value, cu, longest, varlen_attn, causal, has_gqa):
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        extra = {}
        if groups > 1 and has_gqa:
            extra["enable_gqa"] = True
        elif groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)  # (the layer-number scaling undone there)
        out = varlen_attn(query, key, value, cu, cu, longest, longest, scale=scale, **causal, **extra)
        return out.reshape(out.shape[0], 1, -1)


def use_packed_attention(spec) -> None:
    """Give every layer of a local spec (a layer's ModuleSpec, or a block's TransformerBlockSubmodules) this core
    attention."""
    layers = getattr(spec, "layer_specs", None) or [spec]
    for layer in layers:
        attention = layer.submodules.self_attention.submodules
        if attention.core_attention is DotProductAttention:
            attention.core_attention = PackedDotProductAttention
