"""Starting the rollout engine that rollout.engine names, from an exported weights folder (rank 0).

- embedded: transformers generation in the trainer's process, or (asynchronous rollouts) in a process of its own so
  that it runs beside training (rollout/engine_process.py).
- sglang: local servers started here (each on its own GPUs when there are GPUs, rollout.sglang.gpus), or servers
  attached by URL, driven over HTTP; either way generation runs in the servers, beside training.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def wants_routes(cfg) -> bool:
    """Whether completions carry the engine's MoE routes: for routing replay from the engine (r3), or asked for."""
    return cfg.policy.routing_replay == "r3" or cfg.rollout.return_routes


def start_engine(cfg, weights: Path, version: int, *, tokenizer, out: Path, separate_process: bool,
                 say=lambda text: None):
    rc = cfg.rollout
    if rc.engine == "embedded":
        from ..rollout import EmbeddedEngine

        if separate_process:
            from ..rollout.engine_process import EngineProcess

            say("starting the embedded engine in a process of its own (asynchronous rollouts)")
            return EngineProcess(EmbeddedEngine, weights, str(version), max_batch_prompts=rc.embedded_batch_prompts)
        return EmbeddedEngine(weights, str(version), max_batch_prompts=rc.embedded_batch_prompts)
    return _start_sglang(cfg, weights, version, tokenizer, out, say)


def _start_sglang(cfg, weights: Path, version: int, tokenizer, out: Path, say):
    from ..policy.parallel import free_port
    from ..rollout.sglang import SGLangEngine, SGLangServer

    sc = cfg.rollout.sglang
    routes = wants_routes(cfg)
    args = tuple(sc.args) + (("--enable-return-routed-experts",) if routes and
                             "--enable-return-routed-experts" not in sc.args else ())
    route_shape = None
    if routes:
        from ..policy.hf_config import read_hf_config

        arch = read_hf_config(weights)
        route_shape = (arch.num_layers, arch.moe_topk)
    python = sc.python or os.environ.get("SAPO_SGLANG_PYTHON") or sys.executable
    count = 0 if sc.urls else sc.num_servers
    devices = [{}] * count
    if count and torch.cuda.is_available():
        from ..rollout.config import local_server_devices

        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
        devices = [{"CUDA_VISIBLE_DEVICES": d} for d in local_server_devices(
            sc.gpus, count, device_count=torch.cuda.device_count(), trainer_local_ranks=local_ranks,
            visible=os.environ.get("CUDA_VISIBLE_DEVICES"))]
    servers = []
    try:
        for i in range(count):
            server = SGLangServer(weights, free_port(), python=python, log_path=out / "logs" / f"sglang_{i}.log",
                                  extra_args=args, env={**sc.env, **devices[i]},
                                  startup_timeout=sc.startup_timeout_s)
            say(f"starting SGLang server {i} on port {server.port} (log: {server.log_path})")
            servers.append(server)
            server.start()
        engine = SGLangEngine(tokenizer, servers=servers, urls=sc.urls, concurrency=sc.concurrency,
                              retries=sc.retries, request_timeout=sc.request_timeout_s,
                              hang_timeout=sc.hang_timeout_s, route_shape=route_shape)
        if routes:
            engine.check_routes_available()
        engine.update_weights(weights, str(version))  # tags responses with our version (loads ours on attached ones)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return engine
