"""The policy component's configuration (`policy.*` keys): which model, how it is laid out across ranks."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses.config import check_choice
from .routing import REPLAY_MODES

PARAMS_DTYPES = ("float32", "bfloat16", "float16")
MOE_DISPATCHERS = ("allgather", "alltoall")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
# Megatron-Core's selective-recompute modules that a model built here can use: "moe_act" needs grouped-GEMM experts
# (TransformerEngine's), "mla_up_proj" multi-latent attention, neither of which the policy builds
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "shared_experts")
NEEDS = {"moe_act": "grouped-GEMM experts (moe_grouped_gemm, with TransformerEngine), which this policy does not "
                    "build: recompute 'moe' (the whole MoE layer) instead",
         "mla_up_proj": "multi-latent attention, which no converted architecture uses yet"}


def _check_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class PolicyConfig:
    model_path: str = ""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None  # None: Megatron's default, the tensor-parallel size
    params_dtype: str = "float32"
    moe_token_dispatcher: str = "allgather"
    moe_aux_loss_coeff: float | None = None  # None: the HF config's router_aux_loss_coef
    seed: int = 1234
    # optimisation (Adam through Megatron's optimizer; the scheduler warms up linearly, then decays)
    micro_batch_size: int = 1
    # micro-batches sized by tokens (megatron_sapo/batching): > 0 puts each update's rows into micro-batches of at
    # most this many computed positions (rows x their own longest row), balances the rows' work over data-parallel
    # ranks and leaves micro_batch_size unused; 0 keeps micro_batch_size rows at the mini-batch's longest row
    max_tokens_per_micro_batch: int = 0
    # sequence packing (batching/packing.py, policy/packing.py): each micro-batch one row of its rows' tokens back to
    # back (THD, attention within each row, positions restarting), up to max_tokens_per_micro_batch tokens: no
    # padding between rows. Needs the budget
    pack_sequences: bool = False
    # activation recompute (Megatron-Core's): none; selective (recompute_modules, Megatron's default core_attn);
    # full (whole layers: recompute_method uniform, chunks of recompute_num_layers layers, or block, the first
    # recompute_num_layers layers of each pipeline stage). Trades about one more forward for activation memory.
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_steps: int | None = None  # None: no decay after warmup
    lr_decay_style: str = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    use_distributed_optimizer: bool = False
    # MoE routing replay (policy/routing.py): none, r2 (the old-log-prob forward's experts in training) or r3 (the
    # rollout engine's experts in the old-log-prob forward and in training)
    routing_replay: str = "none"
    # HF export (policy/hf_export.py): safetensors shard size (Hugging Face's default, 5 GB) and the stream's bucket
    export_shard_mb: int = 5000
    export_bucket_mb: int = 512

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
            _check_size(name, getattr(self, name))
        if self.expert_tensor_parallel_size is not None:
            _check_size("expert_tensor_parallel_size", self.expert_tensor_parallel_size)
        check_choice("params_dtype", self.params_dtype, PARAMS_DTYPES)
        check_choice("moe_token_dispatcher", self.moe_token_dispatcher, MOE_DISPATCHERS)
        check_choice("lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        check_choice("routing_replay", self.routing_replay, REPLAY_MODES)
        for name in ("micro_batch_size", "export_shard_mb", "export_bucket_mb"):
            _check_size(name, getattr(self, name))
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "adam_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            raise ValueError(f"adam betas must lie in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.lr_warmup_steps < 0 or (self.lr_decay_steps is not None and self.lr_decay_steps <= 0):
            raise ValueError("lr_warmup_steps must be >= 0 and lr_decay_steps > 0 (or None)")
        check_choice("recompute", self.recompute, RECOMPUTE)
        check_choice("recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        _check_size("recompute_num_layers", self.recompute_num_layers)
        for module in self.recompute_modules:
            if module in NEEDS:
                raise ValueError(f"recompute_modules: {module!r} needs {NEEDS[module]}")
            check_choice("recompute_modules", module, RECOMPUTE_MODULES)
        if self.recompute == "selective" and not self.recompute_modules:
            raise ValueError("recompute=selective needs at least one of recompute_modules "
                             f"({', '.join(RECOMPUTE_MODULES)})")
        budget = self.max_tokens_per_micro_batch
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"max_tokens_per_micro_batch must be an integer >= 0 (0: off), got {budget!r}")
        if not isinstance(self.pack_sequences, bool):
            raise ValueError(f"pack_sequences must be true or false, got {self.pack_sequences!r}")
        if self.pack_sequences and not budget:
            raise ValueError("pack_sequences needs max_tokens_per_micro_batch > 0 (a packed row's token budget)")
        if self.moe_aux_loss_coeff is not None and not self.moe_aux_loss_coeff >= 0:
            raise ValueError(f"moe_aux_loss_coeff must be >= 0 or None, got {self.moe_aux_loss_coeff!r}")

    @property
    def expert_tensor_parallel(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size
