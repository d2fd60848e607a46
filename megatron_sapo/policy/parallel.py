"""Megatron-Core's parallel state for the policy: the one place that initialises TP/PP/EP groups and the seeds."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from . import cpu_compat
from .config import PolicyConfig
from .hf_config import HFArchitecture
from .model import check_layout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_rank_entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)  # gloo on a few cores: one thread per rank is several times faster
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_local(fn, nprocs: int, *args) -> None:
    """Run fn(rank, *args) on `nprocs` local processes with the torch.distributed environment of one machine
    (a free loopback port, gloo over lo); for CPU tests, tools and demos. fn must be a module-level function."""
    import torch.multiprocessing as mp

    mp.spawn(_local_rank_entry, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)


def init_distributed() -> None:
    """Join the process group from the torchrun/srun environment (a world of one when there is none)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))  # the GPU of a task on its node
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process run (torchrun and srun recipes set it)")
        # a world of one needs no rendezvous: an in-memory store, so no port can be taken by another process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(backend)


def initialize(arch: HFArchitecture, cfg: PolicyConfig) -> None:
    """Process group, model-parallel groups and seeds, after checking the layout against the model."""
    from megatron.core import parallel_state, tensor_parallel

    init_distributed()
    check_layout(arch, cfg, dist.get_world_size())
    cpu_compat.enable()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=cfg.expert_tensor_parallel,
    )
    torch.manual_seed(cfg.seed)
    # the CUDA RNG tracker cannot be seeded without CUDA; the inference tracker works on both
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed, inference_rng_tracker=not torch.cuda.is_available())
