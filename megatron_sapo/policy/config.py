"""The policy component's configuration (`policy.*` keys): which model, how it is laid out across ranks."""

from __future__ import annotations

from dataclasses import dataclass

from ..losses.config import check_choice

PARAMS_DTYPES = ("float32", "bfloat16", "float16")
MOE_DISPATCHERS = ("allgather", "alltoall")


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

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
            _check_size(name, getattr(self, name))
        if self.expert_tensor_parallel_size is not None:
            _check_size("expert_tensor_parallel_size", self.expert_tensor_parallel_size)
        check_choice("params_dtype", self.params_dtype, PARAMS_DTYPES)
        check_choice("moe_token_dispatcher", self.moe_token_dispatcher, MOE_DISPATCHERS)
        if self.moe_aux_loss_coeff is not None and not self.moe_aux_loss_coeff >= 0:
            raise ValueError(f"moe_aux_loss_coeff must be >= 0 or None, got {self.moe_aux_loss_coeff!r}")

    @property
    def expert_tensor_parallel(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size
