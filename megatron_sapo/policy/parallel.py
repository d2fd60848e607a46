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
    # LOCAL_RANK: on a GPU machine each rank takes its own device (init_distributed), not all of them GPU 0
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)  # gloo on a few cores: one thread per rank is several times faster
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_local(fn, nprocs: int, *args) -> None:
    """Run fn(rank, *args) on `nprocs` local processes with the torch.distributed environment of one machine
    (a free loopback port; gloo over lo without CUDA, NCCL with one GPU per process); for tests, tools and demos.
    fn must be a module-level function."""
    import torch.multiprocessing as mp

    if torch.cuda.is_available() and torch.cuda.device_count() < nprocs:
        raise ValueError(f"{nprocs} processes need {nprocs} GPUs under NCCL (one each); this machine has "
                         f"{torch.cuda.device_count()}")

    mp.spawn(_local_rank_entry, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)


_cpu_world: tuple | None = None  # (the default group it was made for, the gloo group)


def cpu_world_group():
    """A gloo group of every rank, for collectives of Python objects: those are pickled into byte tensors, which
    over NCCL would be CUDA tensors (gathering the exported model would put all of it on GPU 0). None (the default
    group) when the default group is gloo already. Collective the first time, on every rank."""
    global _cpu_world
    if dist.get_backend() == "gloo":
        return None
    default = dist.distributed_c10d._get_default_group()
    if _cpu_world is None or _cpu_world[0] is not default:
        _cpu_world = (default, dist.new_group(backend="gloo"))
    return _cpu_world[1]


def first_error(error: str | None) -> str | None:
    """The first rank's error message (None: no rank had one), on every rank: a failure on one rank then stops them
    all at the same point instead of leaving the others waiting in a collective. Collective over all ranks; one
    all-gather of small objects through the CPU group."""
    if dist.get_world_size() == 1:
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=cpu_world_group())
    return next((e for e in errors if e is not None), None)


def init_distributed() -> None:
    """Join the process group from the torchrun/srun environment (a world of one when there is none). A world of one
    leaves os.environ as it was: a RANK set here would be inherited by every process this one starts (an srun of
    another job included) and make each of them rank 0."""
    if dist.is_initialized():
        return
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))  # the GPU of a task on its node
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local_rank = int(env.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU: this process sees {torch.cuda.device_count()} "
                               "(one process per GPU: check --nproc_per_node / --gpus-per-node / CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_device(local_rank)
    if env.get("WORLD_SIZE", "1") == "1" and "MASTER_PORT" not in env:
        # no rendezvous needed: an in-memory store, so no port can be taken by another process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    if "MASTER_PORT" not in env:
        raise RuntimeError("MASTER_PORT is not set for a multi-process run (torchrun and srun recipes set it)")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
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
