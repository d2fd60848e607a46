"""Shared pieces of the policy tests: tiny HF models, a Megatron forward on one rank, the transformers reference."""

import importlib.util
import sys
from pathlib import Path

import torch

from megatron_sapo.policy.policy import causal_mask

REPO = Path(__file__).resolve().parents[2]


def tiny_models():
    spec = importlib.util.spec_from_file_location("tiny_models", REPO / "tools" / "tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tiny_models", module)
    spec.loader.exec_module(module)
    return module


def megatron_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    b, s = input_ids.shape
    positions = torch.arange(s)[None].expand(b, s)
    with torch.no_grad():
        return model(input_ids, positions, causal_mask(s))


def token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) in float64, from logits over (at least) the real vocab."""
    logp = torch.log_softmax(logits[..., :vocab].double(), dim=-1)
    return logp[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
