"""Each Megatron adaptation is keyed on the condition that needs it: on a GPU machine without TransformerEngine
(simulated here in a fresh process by making torch report CUDA, the one fault this CPU machine cannot produce), the
TE-missing adaptations apply (the router's te_general_gemm is defined, the torch norm accepts sequence parallelism)
and none of the CUDA-missing ones does; on this CPU machine both kinds apply."""

import json
import subprocess
import sys

PROBE = r"""
import json, sys, torch
if sys.argv[1] == "gpu-without-te":
    torch.cuda.is_available = lambda: True
original_current_device = torch.cuda.current_device
from megatron.core.optimizer import optimizer as megatron_optimizer
original_clip = megatron_optimizer.clip_grad_by_total_norm_fp32
from megatron_sapo.policy import cpu_compat
cuda_adapted = cpu_compat.enable()


def model_code_probe():
    # where "cuda" is made on the CPU: inside cuda_as_cpu(), not inside model_code() within it, and again after
    if torch.cuda.is_available():
        return None
    def made_on():
        try:
            return torch.zeros(1, device="cuda").device.type
        except (RuntimeError, AssertionError):
            return "refused"
    with cpu_compat.cuda_as_cpu():
        before = made_on()
        with cpu_compat.model_code():
            inside = made_on()
        after = made_on()
    with cpu_compat.model_code():  # outside cuda_as_cpu() it changes nothing
        alone = made_on()
    return [before, inside, after, alone]


from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, sequence_parallel=True,
                           tensor_model_parallel_size=2, normalization="RMSNorm", use_cpu_initialization=True)
norm = WrappedTorchNorm(config, 8)
print(json.dumps({
    "uses_te": cpu_compat.uses_transformer_engine(), "cuda_adapted": cuda_adapted,
    "te_general_gemm_defined": hasattr(moe_utils, "te_general_gemm"),
    "norm_weight_sequence_parallel": all(getattr(p, "sequence_parallel", False) for p in norm.parameters()),
    "current_device_replaced": torch.cuda.current_device is not original_current_device,
    "clip_replaced": megatron_optimizer.clip_grad_by_total_norm_fp32 is not original_clip,
    "model_code_leaves_the_mode": model_code_probe(),
}))
"""


def _probe(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_gpu_without_transformer_engine_gets_only_the_te_adaptations():
    state = _probe("gpu-without-te")
    assert state == {"uses_te": False, "cuda_adapted": False, "te_general_gemm_defined": True,
                     "norm_weight_sequence_parallel": True, "current_device_replaced": False,
                     "clip_replaced": False, "model_code_leaves_the_mode": None}


def test_cpu_gets_both_kinds():
    state = _probe("cpu")
    assert state == {"uses_te": False, "cuda_adapted": True, "te_general_gemm_defined": True,
                     "norm_weight_sequence_parallel": True, "current_device_replaced": True,
                     "clip_replaced": True, "model_code_leaves_the_mode": ["cpu", "refused", "cpu", "refused"]}


def test_alltoall_dispatcher_without_cuda_is_said(tmp_path, caplog):
    import logging

    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.hf_config import read_hf_config
    from megatron_sapo.policy.model import transformer_config

    from .harness import tiny_models

    tiny_models().build("qwen3_moe", tmp_path)
    with caplog.at_level(logging.WARNING, logger="megatron_sapo.policy"):
        config = transformer_config(read_hf_config(tmp_path), PolicyConfig(model_path=str(tmp_path),
                                                                           moe_token_dispatcher="alltoall"))
    assert config.moe_token_dispatcher_type == "allgather"
    assert "moe_token_dispatcher=alltoall runs as allgather without CUDA" in caplog.text
