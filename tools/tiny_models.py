#!/usr/bin/env python
"""Build tiny, randomly initialised Hugging Face models offline (no hub): Qwen3-MoE, Qwen3, Qwen2 and Llama, saved
with save_pretrained so that transformers, SGLang and megatron_sapo load them like real checkpoints.

    python tools/tiny_models.py qwen3_moe outputs/tiny-qwen3-moe
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=500000.0)
ARCHITECTURES = ("qwen3_moe", "qwen3", "qwen2", "llama")


# A character-level vocabulary: each printable ASCII character is one token, which suits the synthetic tasks
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


def build_tokenizer(out: str | Path | None = None):
    """A character-level fast tokenizer (special tokens, then printable ASCII), saved to `out` when given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    if out is not None:
        tokenizer.save_pretrained(out)
    return tokenizer


def build(arch: str, out: str | Path, *, seed: int = 0, tie_word_embeddings: bool = False,
          with_tokenizer: bool = True, **overrides):
    """Save a tiny random `arch` model (and the character tokenizer) to `out`; return the transformers model (fp32,
    eval mode)."""
    import torch
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    kwargs = dict(COMMON, tie_word_embeddings=tie_word_embeddings)
    if arch == "qwen3_moe":
        # SGLang's Qwen3-MoE ignores tie_word_embeddings: callers keep MoE models untied for it
        kwargs.update(head_dim=32, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        cls = transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM
    elif arch == "qwen3":
        kwargs.update(head_dim=32)
        cls = transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    elif arch == "qwen2":
        cls = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    else:
        cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    kwargs.update(overrides)
    model = cls[1](cls[0](**kwargs)).eval()
    with torch.no_grad():  # random norm weights and biases, so that a mapping error cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    if with_tokenizer:
        tokenizer = build_tokenizer(out)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch", choices=ARCHITECTURES)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.arch, args.out, seed=args.seed, tie_word_embeddings=args.tie_word_embeddings)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
