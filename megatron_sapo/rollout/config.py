"""The rollout component's configuration (`rollout.*` keys): which engine generates, and how it samples.

`rollout.sglang.*` says where the SGLang servers are: attached by URL (servers a cluster job started on rollout nodes)
or started here as local subprocesses from the policy's exported weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..losses.config import check_choice
from .engine import SamplingParams

ENGINES = ("embedded", "sglang")
WEIGHT_SYNCS = ("disk", "distributed")


@dataclass(frozen=True)
class SGLangConfig:
    urls: list[str] = field(default_factory=list)  # running servers to attach to; empty: start `num_servers` here
    num_servers: int = 1
    python: str | None = None  # the servers' interpreter; None: $SAPO_SGLANG_PYTHON, else this one
    args: list[str] = field(default_factory=list)  # extra launch_server arguments (e.g. --tp-size 8, CPU settings)
    env: dict = field(default_factory=dict)  # extra environment of the server processes
    concurrency: int = 64  # requests in flight over all servers
    retries: int = 3
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0  # a generation or disk weight-update request without an answer: retried elsewhere
    hang_timeout_s: float = 60.0  # a local server that does not answer /health this long is hung: killed, restarted
    update_timeout_s: float = 300.0  # distributed sync: a server's answer per bucket; past it, sync through a folder
    # "disk": export a versioned HF folder, servers reload it (needs a filesystem both sides see);
    # "distributed": broadcast the tensors over a process group with the servers (NCCL on GPUs, gloo on CPU)
    weight_sync: str = "disk"
    bucket_mb: int = 512  # distributed sync: bytes per broadcast
    master_address: str | None = None  # distributed sync: this host's address as the servers reach it;
    #                                    None: $MASTER_ADDR, else 127.0.0.1. The senders of later pipeline stages
    #                                    on other nodes use their own host's address.
    # GPUs (indices as this process sees them) for the servers started here, split evenly between them in order;
    # they must not be the trainer's own (local ranks 0 .. LOCAL_WORLD_SIZE - 1). Unused without CUDA.
    gpus: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("rollout.sglang.weight_sync", self.weight_sync, WEIGHT_SYNCS)
        for name in ("num_servers", "concurrency", "bucket_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"rollout.sglang.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"rollout.sglang.retries must be an integer >= 0, got {self.retries!r}")
        for name in ("startup_timeout_s", "request_timeout_s", "hang_timeout_s", "update_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"rollout.sglang.{name} must be a number of seconds > 0, got {value!r}")
        bad = [u for u in self.urls if not isinstance(u, str) or not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"rollout.sglang.urls must be http(s) URLs, got {bad}")
        if any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in self.gpus) \
                or len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"rollout.sglang.gpus must be distinct GPU indices >= 0, got {self.gpus!r}")
        if self.gpus and len(self.gpus) % self.num_servers:
            raise ValueError(f"rollout.sglang.gpus: {len(self.gpus)} GPUs do not split evenly over num_servers = "
                             f"{self.num_servers}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise ValueError(f"rollout.sglang.env must map strings to strings, got {self.env!r}")


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "embedded"  # "embedded" (transformers in the trainer's process, the CPU default) or "sglang"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings; EOS always stops
    embedded_batch_prompts: int = 64  # prompts per transformers generate call (each with its n samples)
    # the engine's MoE routes with every completion (routing/engine_agree; always on with policy.routing_replay=r3)
    return_routes: bool = False
    sglang: SGLangConfig = field(default_factory=SGLangConfig)

    def __post_init__(self) -> None:
        check_choice("rollout.engine", self.engine, ENGINES)
        try:
            self.sampling()
        except ValueError as err:
            raise ValueError(f"rollout.{err}") from None
        if isinstance(self.embedded_batch_prompts, bool) or not isinstance(self.embedded_batch_prompts, int) \
                or self.embedded_batch_prompts < 1:
            raise ValueError(f"rollout.embedded_batch_prompts must be an integer >= 1, got "
                             f"{self.embedded_batch_prompts!r}")

    def sampling(self, *, temperature: float | None = None, seed: int | None = None) -> SamplingParams:
        return SamplingParams(temperature=self.temperature if temperature is None else temperature, top_p=self.top_p,
                              top_k=self.top_k, max_new_tokens=self.max_new_tokens, stop=tuple(self.stop), seed=seed)


def local_server_devices(gpus: list[int], num_servers: int, *, device_count: int, trainer_local_ranks: int,
                         visible: str | None) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each SGLang server started on this node: `gpus` split evenly in order, indices mapped
    through this process's own CUDA_VISIBLE_DEVICES (`visible`) when it has one. A ValueError names the problem when
    there are no GPUs to give, an index does not exist, or a GPU is one of the trainer's (local ranks 0 .. n - 1),
    which a server would fill with its KV cache and starve."""
    if not gpus:
        raise ValueError(f"local SGLang servers need GPUs of their own: set rollout.sglang.gpus (this node has "
                         f"{device_count} GPUs, the trainer uses 0..{trainer_local_ranks - 1}), or attach running "
                         "servers with rollout.sglang.urls")
    missing = [g for g in gpus if g >= device_count]
    if missing:
        raise ValueError(f"rollout.sglang.gpus {missing} do not exist: this process sees {device_count} GPUs")
    shared = sorted(set(gpus) & set(range(trainer_local_ranks)))
    if shared:
        raise ValueError(f"rollout.sglang.gpus {shared} are the trainer's (its {trainer_local_ranks} local ranks use "
                         f"GPUs 0..{trainer_local_ranks - 1}): give the servers other GPUs")
    names = visible.split(",") if visible else [str(i) for i in range(device_count)]
    per_server = len(gpus) // num_servers
    return [",".join(names[g] for g in gpus[i * per_server:(i + 1) * per_server]) for i in range(num_servers)]
