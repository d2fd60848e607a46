"""Shared pieces of the policy tests: tiny HF models, a Megatron forward on one rank, the transformers reference, the
weight stream's memory bound."""

import importlib.util
import sys
from pathlib import Path

import torch

from megatron_sapo.policy.policy import causal_mask

REPO = Path(__file__).resolve().parents[2]
MB = 1 << 20
SLACK = 8 * MB


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


def assert_transformers_routes(model_dir, completions) -> None:
    """Each completion's engine routes equal the top-k experts transformers' routers pick for the same tokens in
    one teacher-forced forward of the whole sequence (every token but the last, which the engine never fed)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    picked = {}
    for index, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, o, i=index: picked.__setitem__(i, o[2]))
    for c in completions:
        with torch.no_grad():
            model(torch.tensor([c.prompt_ids + c.output_ids]))
        expected = torch.stack([picked[i] for i in range(len(model.model.layers))], dim=1)[:-1]
        assert c.routes is not None and c.routes.shape == expected.shape, (c.routes, expected.shape)
        assert len(expected) == len(c.prompt_ids) + len(c.output_ids) - 1
        assert torch.equal(c.routes.sort(-1).values, expected.sort(-1).values.to(torch.int16))


def stream_bound(policy, bucket_bytes: int, buckets: int = 2) -> int:
    """The stated bound of policy/hf_stream.py on this layout: `buckets` buckets (one being filled, the consumer's),
    twice the full pieces of the largest parameter (x EP for an expert one: the pieces and their concatenation),
    and slack for the allocator and gloo's buffers."""
    from megatron.core import parallel_state as ps

    largest = 0
    for name, p in policy.module.named_parameters():
        expert = "local_experts" in name
        parts = ps.get_expert_tensor_parallel_world_size() if expert else ps.get_tensor_model_parallel_world_size()
        copies = parts * (ps.get_expert_model_parallel_world_size() if expert else 1)
        largest = max(largest, p.numel() * p.element_size() * copies)
    return buckets * bucket_bytes + 2 * largest + SLACK
