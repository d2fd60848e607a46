"""The model's Hugging Face tensors, streamed out of the sharded Megatron parameters in buckets of bounded bytes: the
one path by which weights leave the trainer (the disk export and the checkpoint -> HF converter, policy/hf_export.py;
the distributed sync to SGLang, loop/publisher.py).

Design: one sender per pipeline stage. A stage's weights live only on its ranks, so the stage's first rank (tensor,
data and expert ranks all 0) rebuilds and emits that stage's HF tensors, and the stages stream side by side: every
byte leaves the trainer once, from the stage that holds it, and no rank ever holds another stage's tensors (relaying
through global rank 0 would move every byte twice and serialise the stages). Per Megatron parameter, in parameter
order:
  replicated (norms, router)   the sender's own copy, no collective
  tensor-parallel split        one gather over the tensor-parallel group of data-parallel replica 0, to the sender
  expert (local expert j)      one gather over the expert-tensor-parallel group (expert-data-parallel replica 0) to
                               its ETP rank 0, which unshards it; then one gather over the expert-parallel group to
                               the sender: expert e * experts_per_rank + j of every EP rank e arrives at once
Other data-parallel replicas take no part. A tied output layer (PP > 1) is left out: the first stage sends the
embedding. Cost: at most two gathers per parameter, nothing else; the pieces stay on the parameters' device (NCCL
on GPUs, gloo on CPU) and leave in the model's params_dtype (Megatron's norms keep fp32 weights in a bf16 model; an
HF checkpoint and an SGLang server hold one dtype).

Memory bound, every rank, at any time: a sender holds the bucket being filled (at most bucket_bytes, or one HF tensor
larger than that alone) plus the pieces of one parameter (its full size for a dense one, EP x one expert's for an
expert one), plus what the consumer keeps of earlier buckets (the disk writer: nothing; the SGLang sync: the bucket in
flight); any other rank holds at most one parameter's gathered pieces (an ETP rank 0: one full expert). Nothing
grows with the number of layers or experts.

Every rank of the model runs the stream to its end, in step (the gathers are collective); a rank that is not a sender
gets no buckets. `stage_plan` lists, without any collective, the (name, shape, dtype) a sender will emit, in order,
so that a writer lays out its files before the first byte moves.
"""

from __future__ import annotations

import copy
import math
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist

from ..buckets import buckets
from .hf_config import HFArchitecture
from .hf_weights import Layout, Rule, WeightMismatchError, rule_for, unshard


class TensorSpec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class Roles:
    """This rank's part in the stream, from megatron.core.parallel_state."""

    def __init__(self, arch: HFArchitecture, config):
        from megatron.core import parallel_state as ps

        self.lay = lay = Layout(arch, config)
        self.stage = ps.get_pipeline_model_parallel_rank()
        self.dense_holder = ps.get_data_parallel_rank() == 0
        self.expert_holder = ps.get_expert_data_parallel_rank() == 0
        self.sender = self.dense_holder and lay.tp_rank == 0
        expert_sender = self.expert_holder and lay.etp_rank == 0 and lay.ep_rank == 0
        if self.sender != expert_sender:
            raise RuntimeError(f"unexpected rank order: tensor/data rank 0 of stage {self.stage} is rank "
                               f"{dist.get_rank()} but its expert ranks are etp {lay.etp_rank}, ep {lay.ep_rank}")
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.etp_group = ps.get_expert_tensor_parallel_group()
        self.ep_group = ps.get_expert_model_parallel_group()


def _gather(value: torch.Tensor, parts: int, group, receive: bool) -> list[torch.Tensor] | None:
    """The `parts` pieces of `value` over `group`, in group-rank order, on its rank 0 (`receive`); None elsewhere."""
    if parts == 1:
        return [value]
    value = value.contiguous()
    pieces = [torch.empty_like(value) for _ in range(parts)] if receive else None
    dist.gather(value, pieces, group=group, group_dst=0)
    return pieces


def _hf_tensors(model, arch: HFArchitecture, *, plan_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) on the stage's sender, in stream order. plan_only: meta tensors, no collective."""
    roles = Roles(arch, model.config)
    lay = roles.lay
    dtype = model.config.params_dtype
    for name, param in model.named_parameters():
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        rule = rule_for(name, arch, lay)
        if rule is None:
            raise WeightMismatchError(f"no HF name known for Megatron parameter {name}")
        # one dtype, the model's: Megatron's local-spec norms keep fp32 weights in a bf16 model, while HF checkpoints
        # and the SGLang servers hold every tensor in the config's dtype
        value = torch.empty(param.shape, dtype=dtype, device="meta") if plan_only else param.detach().to(dtype)
        if rule.group == "etp":
            yield from _expert(name, rule, value, arch, roles, plan_only)
        elif roles.dense_holder:
            parts = lay.tp if rule.group == "tp" else 1
            pieces = [value] * parts if plan_only else _gather(value, parts, roles.tp_group, roles.sender)
            if roles.sender:
                yield from zip(rule.keys, unshard(rule, pieces, arch))


def _expert(name: str, rule: Rule, value: torch.Tensor, arch: HFArchitecture, roles: Roles, plan_only: bool):
    lay = roles.lay
    if not roles.expert_holder:
        return
    pieces = [value] * lay.etp if plan_only else _gather(value, lay.etp, roles.etp_group, lay.etp_rank == 0)
    if lay.etp_rank != 0:
        return
    full = unshard(rule, pieces, arch)  # this EP rank's expert as HF tensors (fc1: gate, up)
    per_ep_rank = [[t] * lay.ep if plan_only else _gather(t, lay.ep, roles.ep_group, roles.sender) for t in full]
    if not roles.sender:
        return
    for ep_rank in range(lay.ep):
        owner = copy.copy(lay)
        owner.ep_rank = ep_rank
        for key, gathered in zip(rule_for(name, arch, owner).keys, per_ep_rank):
            yield key, gathered[ep_rank]


def sender_stage(model, arch: HFArchitecture) -> int | None:
    """The pipeline stage whose tensors this rank sends, None if it sends none."""
    roles = Roles(arch, model.config)
    return roles.stage if roles.sender else None


def stage_plan(model, arch: HFArchitecture) -> list[TensorSpec]:
    """What this rank will emit, in order (empty unless it is a sender). Local: no collective, no tensor data."""
    return [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in _hf_tensors(model, arch, plan_only=True)]


@torch.no_grad()
def hf_buckets(model, arch: HFArchitecture, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This stage's HF tensors in buckets of at most `bucket_bytes` of one dtype (a larger tensor alone), on the
    stage's sender; nothing elsewhere. Collective: every rank of the model iterates it to the end. A tensor may be a
    view of a live parameter: use a bucket before the next optimizer step."""
    yield from buckets(_hf_tensors(model, arch, plan_only=False), bucket_bytes)
