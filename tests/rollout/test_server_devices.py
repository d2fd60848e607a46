"""GPUs for the SGLang servers the trainer starts on its own node: split evenly, mapped through the trainer's own
CUDA_VISIBLE_DEVICES, never one of the trainer's GPUs, and a clear error when there are none (pure logic: the GPU
launch itself needs a GPU machine)."""

import pytest

from megatron_sapo.rollout.config import SGLangConfig, local_server_devices


def test_gpus_split_evenly_and_map_through_visible_devices():
    assert local_server_devices([4, 5, 6, 7], 2, device_count=8, trainer_local_ranks=4, visible=None) == ["4,5", "6,7"]
    assert local_server_devices([2, 3], 1, device_count=4, trainer_local_ranks=2,
                                visible="GPU-a,GPU-b,GPU-c,GPU-d") == ["GPU-c,GPU-d"]


def test_missing_shared_or_absent_gpus_are_named():
    with pytest.raises(ValueError, match="need GPUs of their own: set rollout.sglang.gpus .* trainer uses 0..7"):
        local_server_devices([], 1, device_count=8, trainer_local_ranks=8, visible=None)
    with pytest.raises(ValueError, match=r"gpus \[3\] are the trainer's"):
        local_server_devices([3, 4], 1, device_count=8, trainer_local_ranks=4, visible=None)
    with pytest.raises(ValueError, match=r"gpus \[9\] do not exist: this process sees 9 GPUs"):
        local_server_devices([8, 9], 1, device_count=9, trainer_local_ranks=4, visible=None)


def test_config_refuses_bad_gpu_lists():
    with pytest.raises(ValueError, match="distinct GPU indices"):
        SGLangConfig(gpus=[1, 1])
    with pytest.raises(ValueError, match="3 GPUs do not split evenly over num_servers = 2"):
        SGLangConfig(gpus=[1, 2, 3], num_servers=2)
