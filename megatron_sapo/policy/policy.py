"""The trainable policy: a Megatron-Core GPT (MoE or dense) built from a Hugging Face folder, in Megatron DDP, with
Megatron's optimizer and LR scheduler. It computes old log-probs and takes policy-gradient steps (SAPO, GSPO, the
GRPO family) through the fused output-layer loss of megatron_sapo.ops, so no [tokens, vocab] logits are formed.

Batch convention (PolicyBatch): input_ids [B, S] hold prompt + response; every other tensor is over the S - 1
predicted positions, position t scoring token t + 1 given tokens <= t. Micro-batches run through Megatron's
get_forward_backward_func (pipeline schedules included). Each micro-batch's loss is normalised by the whole
step's token / sequence counts (all-reduced over data parallel), so the accumulated gradient is that of the full
batch's loss, exactly as losses.policy_loss defines it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from ..batching import MicroBatch, MicroBatchPlan, put, take
from ..batching.packing import loss_groups, pack, unpack_index, unpack_into
from ..losses import LossConfig, metric_reduction, reduce_metrics
from ..ops import fused_linear_logprobs, fused_linear_policy_loss
from . import cpu_compat, parallel
from .config import PolicyConfig
from .hf_config import read_hf_config
from .hf_export import export_hf
from .hf_stream import hf_buckets
from .hf_weights import load_hf_weights
from .model import build_model, padded_vocab_size
from .routing import RouteTracker, Routes, fill_unknown, token_order


@dataclass
class PolicyBatch:
    input_ids: torch.Tensor  # [B, S] int64
    response_mask: torch.Tensor  # [B, S-1] bool: position t predicts a response token
    advantages: torch.Tensor  # [B] or [B, S-1]
    old_log_probs: torch.Tensor | None = None  # [B, S-1]; None: computed by the policy before the update
    rollout_log_probs: torch.Tensor | None = None  # [B, S-1] from the rollout engine, for mismatch corrections
    # MoE routes (policy/routing.py), per micro-batch of this batch: what the old-log-prob forward's routers picked by
    # themselves (replayed under r2, compared for routing/replay_agree), and the engine's (replayed under r3)
    old_routes: Routes | None = None
    engine_routes: Routes | None = None
    # the micro-batches over these rows (megatron_sapo/batching): None is micro_batch_size consecutive rows at a
    # time, each at the full width S; a token-budget plan computes each micro-batch at its own longest row
    micro_batches: tuple[MicroBatch, ...] | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be [batch, seq_len >= 2], got {tuple(self.input_ids.shape)}")
        predicted = (self.input_ids.shape[0], self.input_ids.shape[1] - 1)
        for name in ("response_mask", "old_log_probs", "rollout_log_probs"):  # (the routes are checked when used)
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != predicted:
                raise ValueError(f"{name} must be [batch, seq_len - 1] = {predicted}, got {tuple(t.shape)}")


def _hidden_passthrough(config):
    """A forward for the output layer that returns its input as the output layer would see it: gathered from the
    sequence-parallel region (or copied to the tensor-parallel one), whose backward sums the partial input
    gradients of the vocab shards. The fused loss then applies the output weight itself."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, \
        gather_from_sequence_parallel_region

    def forward(input_, weight=None, runtime_gather_output=None):
        if config.sequence_parallel:
            return gather_from_sequence_parallel_region(input_), None
        return copy_to_tensor_model_parallel_region(input_), None
    return forward


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    # True = masked; explicit, because Megatron's default mask is built on "cuda"
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), 1)[None, None]


class Policy:
    """This rank's part of the policy. Every method is collective over all ranks."""

    def __init__(self, cfg: PolicyConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        if cfg.use_distributed_optimizer and not torch.cuda.is_available():
            raise ValueError("use_distributed_optimizer needs CUDA: Megatron-Core 0.16.1's distributed optimizer "
                             "accepts only CUDA parameters; set it to false on CPU")
        self.cfg = cfg
        self.arch = read_hf_config(cfg.model_path)
        parallel.initialize(self.arch, cfg)
        self.first_stage, self.last_stage = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        if cfg.routing_replay != "none" and not self.arch.is_moe:
            raise ValueError(f"policy.routing_replay={cfg.routing_replay} replays MoE routes, but {cfg.model_path} "
                             "has no MoE layers")
        from megatron.core.transformer.moe.router_replay import RouterReplay

        # each router registers its RouterReplay in a process-global list, used here by nobody: keep it from growing
        RouterReplay.clear_global_router_replay_instances()
        model = build_model(self.arch, cfg, pre_process=self.first_stage, post_process=self.last_stage)
        load_hf_weights(model, self.arch, cfg.model_path, padded_vocab_size(self.arch, cfg))
        if self.last_stage:  # the model returns final-normed hidden states; the fused loss applies the output layer
            model.output_layer.forward = _hidden_passthrough(model.config)
        self.model = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                     use_distributed_optimizer=cfg.use_distributed_optimizer),
            module=model,
        )
        from megatron.core.distributed import finalize_model_grads

        # what Megatron's own training loop wires into the config: the schedule then all-reduces gradients over
        # data parallel (and syncs tied embeddings across pipeline stages) after the last micro-batch
        model.config.finalize_model_grads_func = finalize_model_grads
        model.config.no_sync_func = self.model.no_sync
        if cfg.max_tokens_per_micro_batch and not (self.first_stage and self.last_stage):
            # micro-batches of different shapes: pipeline stages exchange each one's shape before its activations.
            # Set after the config's checks, which refuse it with the allgather MoE dispatcher: that dispatcher needs
            # equal shapes across the ranks it gathers from, which aligned plans give (aligned_micro_batches)
            model.config.variable_seq_lengths = True
        dtype = model.config.params_dtype
        with cpu_compat.cuda_as_cpu():  # FP32Optimizer makes its scale tensor on "cuda"
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                                adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
                                clip_grad=cfg.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                params_dtype=dtype, use_distributed_optimizer=cfg.use_distributed_optimizer),
                [self.model],
            )
        model.config.grad_scale_func = self.optimizer.scale_loss
        decay_steps = cfg.lr_decay_steps or 1
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.lr_warmup_steps, lr_decay_steps=max(decay_steps, cfg.lr_warmup_steps + 1),
            lr_decay_style=cfg.lr_decay_style if cfg.lr_decay_steps else "constant",
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
        )
        self.step = 0
        # where the batch and the collectives' small tensors live (NCCL accepts only CUDA tensors)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self._router_loads: list[torch.Tensor] = []
        self.routes = RouteTracker(model, self.arch.num_layers) if self.arch.is_moe else None
        if self.arch.is_moe:
            self._watch_routers(model)

    # ---- pieces of the forward ----------------------------------------------------------------------------------

    @property
    def module(self):
        return self.model.module

    def _output_weight(self) -> tuple[torch.Tensor, int]:
        """(this rank's output-weight rows of real vocab ids, the first id), padded rows left out."""
        from megatron.core import parallel_state as ps

        m = self.module
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights \
            else m.output_layer.weight
        start = ps.get_tensor_model_parallel_rank() * weight.shape[0]
        valid = min(weight.shape[0], self.arch.vocab_size - start)
        if valid <= 0:
            raise ValueError(f"tensor-parallel rank holds only padded vocab rows (vocab {self.arch.vocab_size})")
        return weight[:valid], start

    def _hidden(self, model, input_ids, padding=None, packed: MicroBatch | None = None):
        """Final-normed hidden states [b, s, h] (last stage) of input_ids; sequences are right-padded to a multiple
        of the tensor-parallel size for sequence parallelism, and the padding is cut off again. `padding` [b, s]
        (True: not a token of the sequence) keeps padding out of the MoE routers' auxiliary losses. `packed`: the
        packed micro-batch whose one row input_ids is (policy/packing.py)."""
        seq_len = input_ids.shape[1]
        pad = self._padded_len(input_ids) - seq_len
        if pad:
            input_ids = torch.nn.functional.pad(input_ids, (0, pad))
            padding = None if padding is None else torch.nn.functional.pad(padding, (0, pad), value=True)
        out = self._forward(model, input_ids, padding, packed)
        return out[:, :seq_len] if self.last_stage and pad else out

    def _forward(self, model, input_ids, padding=None, packed: MicroBatch | None = None):
        b, s = input_ids.shape
        if packed is not None:  # one row of several sequences: attention within each, positions restarting
            from .packing import packed_inputs

            params, positions = packed_inputs(packed, s, input_ids.device)
            mask = None
            model = partial(model, packed_seq_params=params)
        else:
            positions = torch.arange(s, device=input_ids.device)[None].expand(b, s)
            mask = causal_mask(s, input_ids.device)
        if padding is None or not self.arch.is_moe:
            return model(input_ids, positions, mask)
        # decided on the whole micro-batch, before any split: every rank of its tensor-parallel group, whose
        # collective the auxiliary loss uses, must decide alike
        only_padding = bool(padding.all())
        if not self.first_stage and self.module.config.sequence_parallel:
            # Megatron scatters the mask to the sequence-parallel chunks only where the embedding runs (the first
            # stage); a later stage's MoE layers see this rank's chunk of the sequence, so it gets that chunk
            from megatron.core import parallel_state as ps

            chunk = s // ps.get_tensor_model_parallel_world_size()
            start = ps.get_tensor_model_parallel_rank() * chunk
            padding = padding[:, start:start + chunk]
        if not only_padding:
            return model(input_ids, positions, mask, padding_mask=padding.contiguous())
        # a micro-batch of padding rows only: Megatron's auxiliary loss would divide by its zero tokens (NaN, and
        # the step skipped); such a micro-batch has no load to balance, so it runs without one
        config = self.module.config
        coeff, config.moe_aux_loss_coeff = config.moe_aux_loss_coeff, 0.0
        try:
            return model(input_ids, positions, mask, padding_mask=padding.contiguous())
        finally:
            config.moe_aux_loss_coeff = coeff

    @staticmethod
    def _tokens(tensor: torch.Tensor, micro_batch: MicroBatch, fill) -> torch.Tensor:
        """A micro-batch's part of a per-token tensor [B, S, ...]: its rows at its length, or its packed row."""
        if micro_batch.packed:
            return pack(tensor, micro_batch, fill)
        return take(tensor, micro_batch, micro_batch.length, fill)

    @staticmethod
    def sequence_padding(response_mask: torch.Tensor) -> torch.Tensor:
        """[B, S] True at the positions after a row's last response token (right padding) and everywhere in a row
        without response tokens (the empty rows that pad a mini-batch): what is not part of a sequence trained on."""
        b, predicted = response_mask.shape
        positions = torch.arange(predicted + 1, device=response_mask.device)
        last = torch.where(response_mask, torch.arange(predicted, device=response_mask.device), -1).amax(dim=1)
        return (positions[None, :] > (last + 1)[:, None]) | (last < 0)[:, None]

    @staticmethod
    def _padded_len(input_ids) -> int:
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
        return -(-input_ids.shape[1] // tp) * tp

    def _run(self, forward_step, plan: tuple[MicroBatch, ...], forward_only: bool):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        tp = ps.get_tensor_model_parallel_world_size()
        shapes = {(mb.width, -(-mb.length // tp) * tp) for mb in plan}
        if len(shapes) > 1 and ps.get_pipeline_model_parallel_world_size() > 1 \
                and not self.module.config.variable_seq_lengths:
            raise ValueError(f"micro-batches of {len(shapes)} shapes under pipeline parallelism need Megatron's "
                             "variable_seq_lengths (set by policy.max_tokens_per_micro_batch > 0)")
        with cpu_compat.cuda_as_cpu():  # (the shape is only read without variable_seq_lengths: then it is one)
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(range(len(plan))), model=[self.model],
                num_microbatches=len(plan), seq_length=max(s for _, s in shapes),
                micro_batch_size=max(w for w, _ in shapes), forward_only=forward_only,
            )

    def _plan(self, input_ids: torch.Tensor, micro_batches) -> tuple[MicroBatch, ...]:
        """The micro-batches over input_ids' rows: the given plan, checked against the batch, or the fixed one."""
        rows, seq_len = input_ids.shape
        if micro_batches is None:
            return MicroBatchPlan.fixed(rows, self.cfg.micro_batch_size, seq_len).micro_batches
        if not micro_batches:
            raise ValueError("a micro-batch plan needs at least one micro-batch (an empty one for a rank without rows)")
        seen = [r for mb in micro_batches for r in mb.rows]
        bad = [mb for mb in micro_batches if any(not 0 <= r < rows for r in mb.rows) or (
            not 2 <= mb.length <= seq_len if not mb.packed else len(mb.segments) != len(mb.rows)
            or sum(mb.segments) > mb.length or any(not 2 <= n <= seq_len for n in mb.segments))]
        if bad or len(seen) != len(set(seen)):
            raise ValueError(f"the micro-batch plan does not fit a batch of {rows} rows x {seq_len} tokens (rows "
                             f"out of range, a row's length outside 2..{seq_len}, or a row in two micro-batches): "
                             f"{(bad or micro_batches)[0]}")
        return tuple(micro_batches)

    def plan_layout(self) -> dict:
        """What batching.plan_micro_batches needs to know of this policy: lengths are computed rounded up to the
        tensor-parallel size (every micro-batch is padded to it), attention's quadratic cost from the model's shape,
        whether micro-batches must have one shape on every data-parallel rank, and whether rows are packed."""
        from megatron.core import parallel_state as ps

        from ..batching import attention_quadratic

        arch = self.arch
        return dict(multiple=ps.get_tensor_model_parallel_world_size(), aligned=self.aligned_micro_batches(),
                    packed=self.cfg.pack_sequences,
                    quadratic=attention_quadratic(layers=arch.num_layers, heads=arch.num_heads, head_dim=arch.head_dim,
                                                  params_per_token=arch.active_params_per_token))

    def aligned_micro_batches(self) -> bool:
        """Whether micro-batch i needs one shape on every data-parallel rank (plan_micro_batches(aligned=True)):
        Megatron's allgather MoE dispatcher all-gathers the tokens of its expert-tensor x expert-parallel group in
        equal shapes, and that group spans data-parallel ranks under expert parallelism, or with an expert-tensor
        size other than the tensor-parallel one. (The alltoall dispatcher exchanges token counts first.)"""
        c = self.module.config
        return self.arch.is_moe and c.moe_token_dispatcher_type == "allgather" and \
            (c.expert_model_parallel_size > 1 or c.expert_tensor_parallel_size != c.tensor_model_parallel_size)

    def _broadcast_from_last_stage(self, obj):
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        return box[0]

    # ---- public API ---------------------------------------------------------------------------------------------

    def log_probs(self, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Per-token log-probs [B, S-1] of input_ids under the current weights (the old-policy forward), on every
        rank, batched in micro-batches like the update."""
        return self.old_log_probs(input_ids, temperature)[0]

    @torch.no_grad()
    def old_log_probs(self, input_ids: torch.Tensor, temperature: float = 1.0, *, replay: Routes | None = None,
                      micro_batches: tuple[MicroBatch, ...] | None = None) -> tuple[torch.Tensor, Routes | None]:
        """log_probs, and (MoE) what this rank's routers picked by themselves in each micro-batch: a train_step on
        the same rows and micro-batches replays them under r2 and measures routing drift against them. `replay`
        (Routes, e.g. the engine's under r3) makes the routers take those experts instead. `micro_batches`: as in
        PolicyBatch; positions past a micro-batch's length are left 0."""
        from megatron.core import parallel_state as ps

        input_ids = input_ids.to(self.device)
        out = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, device=self.device)
        plan = self._plan(input_ids, micro_batches)
        self._check_routes(replay, len(plan), "replay")

        def forward_step(iterator, model):
            i = next(iterator)
            mb = plan[i]
            ids = self._tokens(input_ids, mb, 0)
            if self.routes is not None:
                self.routes.begin(i, None if replay is None else fill_unknown(replay[i]))
            with cpu_compat.model_code():
                hidden = self._hidden(model, ids, packed=mb if mb.packed else None)

            @cpu_compat.model_code()
            def collect(h):
                # packed: each row's last position would predict the next row's first token; it predicts nothing
                targets = pack(input_ids[:, 1:], mb, -100, shift=1) if mb.packed else ids[:, 1:]
                if not bool(torch.isfinite(h).all()):  # NaN log-probs; a train step on them is then skipped
                    values = torch.full(targets.shape, float("nan"), device=out.device)
                else:
                    weight, start = self._output_weight()
                    values = fused_linear_logprobs(
                        h[:, :-1].contiguous(), weight, targets, temperature=temperature,
                        process_group=ps.get_tensor_model_parallel_group(), vocab_start=start)
                if mb.packed:
                    unpack_into(out, mb, values)
                else:
                    put(out, mb, values)
                return h.sum() * 0, {}
            return hidden, collect

        self.model.eval()
        try:
            self._run(forward_step, plan, forward_only=True)
        finally:
            routes = self.routes.finish() if self.routes is not None else None
        self.model.train()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(out, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return out, routes

    def _check_routes(self, routes: Routes | None, micro_batches: int, what: str) -> None:
        if routes is None:
            return
        if self.routes is None:
            raise ValueError(f"{what} routes given, but {self.cfg.model_path} has no MoE layers")
        if len(routes) != micro_batches or any(len(r) != len(self.routes.routers) for r in routes):
            raise ValueError(f"{what} routes cover {len(routes)} micro-batches x "
                             f"{len(routes[0]) if routes else 0} MoE layers; this batch has {micro_batches} x "
                             f"{len(self.routes.routers)} on this rank")

    def engine_routes(self, row_routes: torch.Tensor, input_ids: torch.Tensor,
                      micro_batches: tuple[MicroBatch, ...] | None = None) -> Routes:
        """An engine's routes per row, [B, S, num_layers, k] aligned with input_ids (UNKNOWN where the engine has
        none), as this rank's Routes for a batch of these rows in these micro-batches (as in PolicyBatch);
        ValueError if they do not fit the batch or model."""
        from megatron.core import parallel_state as ps

        from .routing import UNKNOWN, check_routes, native_routes

        if self.routes is None:
            raise ValueError(f"the engine returned MoE routes, but {self.cfg.model_path} has no MoE layers")
        check_routes(row_routes, rows=input_ids.shape[0], seq_len=input_ids.shape[1], num_layers=self.arch.num_layers,
                     topk=self.arch.moe_topk, num_experts=self.arch.num_experts)
        chunks = [self._tokens(row_routes, mb, UNKNOWN) for mb in self._plan(input_ids, micro_batches)]
        return native_routes(chunks, self.routes.layers, tp=ps.get_tensor_model_parallel_world_size(),
                             tp_rank=ps.get_tensor_model_parallel_rank(),
                             sequence_parallel=self.module.config.sequence_parallel)

    def token_mask(self, padding: torch.Tensor, micro_batch: MicroBatch) -> torch.Tensor:
        """[tokens] bool in the routers' order: True where a token of `micro_batch` (rows of `padding` [B, S]) is
        trained."""
        from megatron.core import parallel_state as ps

        rows = ~self._tokens(padding, micro_batch, True)
        return token_order(rows, self._padded_len(rows), ps.get_tensor_model_parallel_world_size(),
                           ps.get_tensor_model_parallel_rank(), self.module.config.sequence_parallel, False)

    def train_step(self, batch: PolicyBatch, loss_config: LossConfig, temperature: float = 1.0) -> dict[str, float]:
        """One optimizer step on the batch (gradient accumulation over its micro-batches). Returns the loss
        library's metrics over the whole step (every micro-batch and every data-parallel rank's rows, each metric by
        its declared reduction) and loss, grad_norm, lr, skipped, MoE routing loads (this rank's tokens). Padding
        (after a row's last response token, and rows without any) is kept out of the MoE auxiliary losses.
        A non-finite loss or gradient norm, or non-finite hidden states or old log-probs, skips the update
        (reported as skipped = 1, loss NaN): it is never applied, and no exception stops the run."""
        from megatron.core import parallel_state as ps

        tensors = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()}
        batch = PolicyBatch(**tensors)
        old, old_routes = batch.old_log_probs, batch.old_routes
        if old is None:
            old, old_routes = self.old_log_probs(
                batch.input_ids, temperature,
                replay=batch.engine_routes if self.cfg.routing_replay == "r3" else None)
        mask = batch.response_mask.bool()
        padding = self.sequence_padding(mask)
        plan = self._plan(batch.input_ids, batch.micro_batches)
        self._check_plan_covers(plan, mask)
        micro_batches = len(plan)
        replay = self._replay_source(old_routes, batch.engine_routes, micro_batches)
        totals = self._global_totals(mask)
        if loss_config.loss_agg_mode == "seq-mean-token-sum-norm" and loss_config.loss_norm_length is None:
            # Dr.GRPO's constant L defaults to the padded length: the batch's, whatever width a micro-batch runs at
            loss_config = dataclasses.replace(loss_config, loss_norm_length=mask.shape[1])
        dp = ps.get_data_parallel_world_size()
        collected: list[dict[str, float]] = []

        def forward_step(iterator, model):
            i = next(iterator)
            mb = plan[i]
            ids = self._tokens(batch.input_ids, mb, 0)
            if self.routes is not None:
                self.routes.begin(i, None if replay is None else fill_unknown(replay[i]))
            with cpu_compat.model_code():
                hidden = self._hidden(model, ids, self._tokens(padding, mb, True), packed=mb if mb.packed else None)

            @cpu_compat.model_code()
            def loss_func(h):
                # the loss works on rows: a packed micro-batch's hidden states are gathered back into rows of
                # similar length (batching/packing.py); otherwise the micro-batch's own rows
                parts = [(h[0][unpack_index(mb, group, width).to(h.device)],
                          MicroBatch(tuple(mb.rows[j] for j in group), width))
                         for group, width in loss_groups(mb)] if mb.packed else [(h, mb)]
                masks = [take(mask, part, part.length - 1, False) for _, part in parts]
                olds = [take(old, part, part.length - 1, 0.0) for _, part in parts]
                if not any(m.any() for m in masks):  # nothing to learn; the step's normalisers already exclude it
                    return h.sum() * 0.0, {}
                if not bool(torch.isfinite(h).all()) or not all(bool(torch.isfinite(o[m]).all())
                                                                 for o, m in zip(olds, masks)):
                    collected.append({"loss": float("nan")})  # the whole step is skipped below, on every rank
                    return h.sum() * 0.0, {}
                weight, start = self._output_weight()
                total = h.sum() * 0.0
                for (rows_h, part), m, o in zip(parts, masks, olds):
                    tokens = part.length
                    rollout = None if batch.rollout_log_probs is None else \
                        take(batch.rollout_log_probs, part, tokens - 1, 0.0)
                    loss, metrics = fused_linear_policy_loss(
                        rows_h[:, :-1].contiguous(), weight, take(batch.input_ids, part, tokens, 0)[:, 1:], o,
                        take(batch.advantages, part, tokens - 1, 0.0), m, config=loss_config,
                        temperature=temperature, rollout_log_probs=rollout,
                        process_group=ps.get_tensor_model_parallel_group(), vocab_start=start,
                        reduce_hidden_grad=False, **totals)  # the passthrough's backward reduces it
                    metrics["loss"] = loss.item()
                    collected.append(metrics)
                    total = total + loss
                # Megatron divides by the number of micro-batches and DDP averages over data parallel; the loss is
                # already normalised by the whole step's counts, so undo both
                return total * (micro_batches * dp), {}
            return hidden, loss_func

        self._router_loads.clear()
        if self.arch.is_moe:
            from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

            clear_aux_losses_tracker()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        try:
            self._run(forward_step, plan, forward_only=False)
        finally:
            trained_routes = self.routes.finish() if self.routes is not None else None
        metrics = None
        if self.last_stage:
            metrics = _merge_metrics(collected)
            metrics.setdefault("loss", 0.0)  # this rank's rows held no response token
            metrics = self._reduce_over_data_parallel(metrics)
        metrics = self._broadcast_from_last_stage(metrics)
        loss_ok = torch.tensor([float(torch.isfinite(torch.tensor(metrics["loss"])))], device=self.device)
        dist.all_reduce(loss_ok, op=dist.ReduceOp.MIN)
        skipped = True
        grad_norm = float("nan")
        if loss_ok.item() == 1.0:
            with cpu_compat.cuda_as_cpu():
                updated, grad_norm, _ = self.optimizer.step()
            skipped = not updated or grad_norm is None or not torch.isfinite(torch.tensor(grad_norm))
            if not skipped:
                self.scheduler.step(increment=1)
                self.step += 1
        metrics.update(grad_norm=float("nan") if grad_norm is None else float(grad_norm), skipped=float(skipped),
                       lr=self.optimizer.param_groups[0]["lr"])
        routed = sum(1 for mb in plan if not bool(self._tokens(padding, mb, True).all()))
        metrics.update(self._routing_metrics(routed))
        if self.routes is not None:
            metrics.update(self._route_agreement(trained_routes, old_routes, batch.engine_routes, padding, plan))
        return metrics

    @staticmethod
    def _check_plan_covers(plan: tuple[MicroBatch, ...], mask: torch.Tensor) -> None:
        """Every response token lies in the plan: its row in a micro-batch, its position within that one's length."""
        reach = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        for mb in plan:
            for row, n in zip(mb.rows, mb.segments or [mb.length] * len(mb.rows)):
                reach[row] = n - 1
        beyond = mask & (torch.arange(mask.shape[1], device=mask.device)[None] >= reach[:, None])
        if beyond.any():
            row = int(beyond.any(dim=1).nonzero()[0])
            raise ValueError(f"the micro-batch plan leaves out response tokens of row {row} (not in any micro-batch, "
                             "or past its micro-batch's length)")

    def _replay_source(self, old_routes: Routes | None, engine_routes: Routes | None, micro_batches: int):
        """The routes a training forward replays under policy.routing_replay, checked against the batch."""
        mode = self.cfg.routing_replay
        if mode == "none":
            return None
        routes = old_routes if mode == "r2" else engine_routes
        if routes is None:
            need = "the old-log-prob forward's routes (old_routes, from old_log_probs)" if mode == "r2" \
                else "the rollout engine's routes (engine_routes)"
            raise ValueError(f"policy.routing_replay={mode} needs {need} with the batch")
        self._check_routes(routes, micro_batches, mode)
        return routes

    def _route_agreement(self, trained: Routes, old: Routes | None, engine: Routes | None, padding: torch.Tensor,
                         plan: tuple[MicroBatch, ...]) -> dict[str, float]:
        """routing/replay_agree (the training forward's own picks vs the old-log-prob forward's) and
        routing/engine_agree (the old-log-prob forward's own picks vs the engine's), each with its worst layer;
        collective over all ranks (policy/routing.py)."""
        valid = [self.token_mask(padding, mb) for mb in plan]
        out = {}
        for name, mine, reference in (("replay", trained, old), ("engine", old, engine)):
            flag = torch.tensor([float(reference is not None)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank takes part in the sums, or none
            if flag.item():
                counts = self.routes.count_agreement(mine, reference, valid)
                out.update(self.routes.agreement(counts, name, self.device))
        return out

    @staticmethod
    def _reduce_over_data_parallel(metrics: dict[str, float]) -> dict[str, float]:
        """The step's metrics over every data-parallel rank's rows: the loss shares summed, the loss library's
        metrics by their declared reductions (token counts summed, the smallest gate weight the smallest of all
        ranks', means weighted by each rank's tokens). One all-gather of a small dict per update."""
        from megatron.core import parallel_state as ps

        group = ps.get_data_parallel_group()
        if dist.get_world_size(group) == 1:
            return metrics
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, metrics, group=group)
        return _merge_metrics(parts)

    def _global_totals(self, mask: torch.Tensor) -> dict[str, float]:
        """Token and sequence counts of the whole step across data parallel, the loss normalisers. A row without
        response tokens is padding (the trainer pads each mini-batch to data-parallel size x micro-batch size), so
        it counts nowhere, also not in Dr.GRPO's number of responses B (seq-mean-token-sum-norm): otherwise the
        loss would depend on the parallel layout."""
        from megatron.core import parallel_state as ps

        rows = mask.any(-1).sum()
        counts = torch.tensor([float(mask.sum()), float(rows)], device=self.device)
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        return {"total_tokens": counts[0].item(), "total_seqs": counts[1].item()}

    def _watch_routers(self, model) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        def record(_module, inputs, output):
            routing_map = output[1].detach()
            if len(inputs) > 1 and inputs[1] is not None:  # the padding mask, [s, b] as the tokens are ordered
                routing_map = routing_map[~inputs[1].reshape(-1)]
            if routing_map.shape[0]:  # a micro-batch of padding rows routes no token
                self._router_loads.append(routing_map.sum(dim=0).float())

        for module in model.modules():
            if isinstance(module, TopKRouter):
                module.register_forward_hook(record)

    def _routing_metrics(self, routed_micro_batches: int) -> dict[str, float]:
        """Tokens per expert over this step's routers (this rank's tokens, this pipeline stage's MoE layers): max /
        mean and min / mean load, averaged over the MoE layers seen; with an auxiliary loss, its unscaled value
        (Megatron's tracker, mean over MoE layers and the micro-batches that held tokens), reduced as Megatron's
        own training log does: summed over pipeline stages and the router's reduce group (the tensor-parallel ranks
        that each routed a part of the sequence), averaged over data parallel. Collective when the loss is on."""
        if not self.arch.is_moe:
            return {}
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, \
            reduce_aux_losses_tracker_across_ranks

        out = {}
        if self._router_loads:
            loads = torch.stack([load / load.mean().clamp(min=1e-9) for load in self._router_loads])
            out = {"moe/load_max_over_mean": loads.max(dim=1).values.mean().item(),
                   "moe/load_min_over_mean": loads.min(dim=1).values.mean().item()}
        if not self.module.config.moe_aux_loss_coeff:
            return out
        from megatron.core import parallel_state as ps

        # Megatron's reduction all-reduces over the pipeline group every name this stage tracked: it would wait
        # forever for a stage without MoE layers, so such layouts keep this stage's values
        tracker = get_moe_layer_wise_logging_tracker()  # process-global, zeroed each step
        for entry in tracker.values():
            entry["values"].div_(max(1, routed_micro_batches))
        if all(self.arch.moe_layers) or ps.get_pipeline_model_parallel_world_size() == 1:
            reduce_aux_losses_tracker_across_ranks()
        moe_layers = max(1, sum(self.arch.moe_layers))
        for name, entry in tracker.items():
            out[f"moe/{name}"] = entry["values"].sum().item() / moe_layers
        return out

    def export_hf(self, out_dir):
        """Write the current weights as a sharded HF folder, streamed (policy/hf_export.py: every stage's sender
        writes its own shards, one bucket in memory at a time; atomic). Collective; returns the folder."""
        return export_hf(self.module, self.arch, out_dir, self.cfg.model_path,
                         shard_bytes=self.cfg.export_shard_mb * 1000**2, bucket_bytes=self.cfg.export_bucket_mb << 20)

    def hf_buckets(self, bucket_bytes: int):
        """The current weights as HF-named tensors in buckets, on each pipeline stage's sender (policy/hf_stream.py).
        Collective: every rank iterates it to the end."""
        return hf_buckets(self.module, self.arch, bucket_bytes)

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every HF tensor of the current weights, cloned, on global rank 0 (None elsewhere); collective. For checks
        on small models: rank 0 holds the whole model (the weight-moving paths stream instead)."""
        from .parallel import cpu_world_group

        mine = {name: tensor.cpu().clone() for bucket in self.hf_buckets(64 << 20) for name, tensor in bucket}
        if dist.get_world_size() == 1:
            return mine
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0, group=cpu_world_group())
        return {name: tensor for part in parts for name, tensor in part.items()} if parts else None


def _merge_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Micro-batch metrics -> step metrics, each by its reduction declared in losses.METRICS; the micro-batch losses
    are already normalised by the whole step's counts, so they add up."""
    return reduce_metrics(parts, lambda key: "sum" if key == "loss" else metric_reduction(key))
