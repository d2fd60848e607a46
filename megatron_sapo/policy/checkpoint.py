"""Policy checkpoints with Megatron-Core dist_checkpointing (torch_dist): model, optimizer, LR scheduler, RNG states
and step, loadable under another TP / PP / EP layout (the tensors are stored with their global shapes); the
distributed optimizer's state (Megatron's "dp_reshardable" format) resumes when only the data-parallel size changes.

Layout of a checkpoint root:
  step_00000012/      one checkpoint: dist_checkpointing files + megatron_sapo.json (what model, which step)
  latest              the name of the newest complete checkpoint
Saving writes into a temporary folder beside its final name and renames it when every rank has finished, then
rewrites `latest` atomically, so a crash leaves the previous checkpoint and `latest` intact; a failed save (a full
disk) is agreed by every rank, removes its temporary folder and is a CheckpointError naming the free space left.
Loading checks megatron_sapo.json against the model first: a checkpoint of another model, or a damaged one, is a
CheckpointError that names the difference or the cause, never a partial load.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from .. import lifeline
from ..atomic import describe_os_error, replace_folder, write_atomic
from . import cpu_compat

MANIFEST = "megatron_sapo.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


_write_results_manager = None


def _arm_megatron_writer_manager() -> None:
    """Megatron-Core's torch_dist saver collects its write workers' results through a queue of a multiprocessing
    manager: a spawned process, started at the first save and kept (filesystem_async._results_queue). Started by
    Megatron, it would outlive a SIGKILLed trainer; started here first, it arms against this process (lifeline.py)
    and Megatron takes our queue."""
    global _write_results_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from multiprocessing.managers import SyncManager

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=lifeline.arm, initargs=(os.getpid(),))
    _write_results_manager = manager  # the manager process lives as long as this object
    filesystem_async._results_queue = manager.Queue()


def _model_identity(policy) -> dict:
    """What a checkpoint must agree on to be loaded into this model (the parallel layout may differ)."""
    arch = asdict(policy.arch)
    arch.pop("raw")
    arch["moe_layers"] = list(arch["moe_layers"])
    return arch


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sub_optimizers(policy) -> list:
    return list(getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]))


def _layout_free_optimizer(policy) -> bool:
    """Whether the optimizer's state can be written per parameter (fp32 params, not the distributed optimizer):
    then it reloads under any layout, whatever Megatron's split into dense and expert optimizers there."""
    from megatron.core.optimizer.optimizer import FP32Optimizer

    return all(isinstance(sub, FP32Optimizer) for sub in _sub_optimizers(policy))


def _optimizer_state(policy, model_state: dict, *, is_loading: bool) -> dict:
    """Adam moments as tensors sharded like their parameters (keyed by the parameter's checkpoint key), and the
    common step count."""
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map, \
        make_sharded_optimizer_tensor

    out: dict = {"exp_avg": [], "exp_avg_sq": []}  # lists in parameter order: several share one checkpoint key
    step = None
    for sub in _sub_optimizers(policy):
        params = sub.get_parameters()
        if is_loading or any("exp_avg" not in sub.optimizer.state[p] for p in params):
            sub.init_state_fn(sub.optimizer, sub.config)  # zero moments: a policy that has not stepped yet
        sharded = get_param_id_to_sharded_param_map(model_state, params)
        for index, param in enumerate(params):
            state = sub.optimizer.state[param]
            step = state.get("step", step)
            for name in ("exp_avg", "exp_avg_sq"):
                out[name].append(make_sharded_optimizer_tensor(sharded[index], state[name], f"optimizer.{name}"))
    out["adam_step"] = step
    return out


def _restore_optimizer_state(policy, loaded: dict) -> None:
    """Put loaded moments back, walking the parameters in the order _optimizer_state wrote them."""
    loaded = {"exp_avg": list(loaded["exp_avg"]), "exp_avg_sq": list(loaded["exp_avg_sq"]),
              "adam_step": loaded["adam_step"]}
    for sub in _sub_optimizers(policy):
        for param in sub.get_parameters():
            state = sub.optimizer.state[param]
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = state[name].copy_(loaded[name].pop(0))
            if loaded["adam_step"] is not None:
                state["step"] = loaded["adam_step"].clone() if torch.is_tensor(loaded["adam_step"]) \
                    else loaded["adam_step"]


def _materialize_distributed_adam_state(policy) -> None:
    """torch's Adam creates its per-parameter state at its first step, and Megatron-Core 0.16's distributed optimizer
    (without apex / TE) reads one common step count from that state when it builds the loading template, asserting
    it exists: a fresh optimizer gets zeroed state first, which the load then overwrites (seen on an H200)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in _sub_optimizers(policy):
        if not isinstance(sub, DistributedOptimizer):
            continue
        for group in sub.optimizer.param_groups:
            for param in group["params"]:
                if not sub.optimizer.state[param]:
                    sub.optimizer.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                                      exp_avg_sq=torch.zeros_like(param))


def _own_step_counters(policy) -> None:
    """Megatron-Core 0.16's distributed optimizer (without apex / TE) loads one step tensor into every parameter's
    Adam state; torch's Adam adds 1 to each parameter's counter in place, so a shared one advances by the number of
    parameters per step and the bias correction goes wrong (a 12% different first update after resuming, seen on an
    H200). Each parameter gets its own copy."""
    seen: set[int] = set()
    for sub in _sub_optimizers(policy):
        for state in sub.optimizer.state.values():
            step = state.get("step")
            if not torch.is_tensor(step):
                continue
            if id(step) in seen:
                state["step"] = step.clone()
            else:
                seen.add(id(step))


def _sharded_state(policy, *, is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_state = policy.model.module.sharded_state_dict()
    rank, world = dist.get_rank(), dist.get_world_size()
    if _layout_free_optimizer(policy):
        optimizer = _optimizer_state(policy, model_state, is_loading=is_loading)
    else:  # Megatron's own format (distributed or mixed-precision optimizer): resume in the same layout
        # the distributed optimizer's default format in Megatron-Core 0.16 ("fully_sharded_model_space") is refused
        # by its own torch_dist saver ("ShardedTensor.flattened_range is not supported", seen on an H200):
        # "dp_reshardable" writes each rank's buffer slices in parallel, with no gather, and resumes when only DP
        # changes. The other optimizers ignore the key.
        if is_loading:
            _materialize_distributed_adam_state(policy)
        optimizer = policy.optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                        metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    return {
        "model": model_state,
        "optimizer": optimizer,
        "scheduler": policy.scheduler.state_dict(),
        "step": policy.step,
        # per-rank RNG states: one shard per rank; loading under another world size restarts the RNG streams
        "rng": ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0),
    }


def _barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(policy, root: str | Path, extra: dict | None = None, *, number: int | None = None,
                    attachments: dict[str, object] | None = None) -> Path:
    """Save the policy as root/step_XXXXXXXX and point root/latest at it (collective; every rank calls it).
    XXXXXXXX is `number` (the trainer passes its RL step) or the policy's optimizer step. `extra` (JSON-serialisable,
    e.g. the trainer's loop state) goes into the manifest, and `attachments` (rank 0's; name -> tensors, lists,
    numbers, as torch.save writes them, e.g. queued rollout batches) into files of the checkpoint folder, so both are
    written atomically with the weights. Read an attachment back with `load_attachment`."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / f"step_{policy.step if number is None else number:08d}"
    tmp = root / f".{final.name}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    from torch.distributed.checkpoint.api import CheckpointException

    from .parallel import first_error

    error = None
    try:
        _arm_megatron_writer_manager()
        with cpu_compat.cuda_as_cpu():
            dist_checkpointing.save(_sharded_state(policy, is_loading=False), str(tmp))
    except (Exception, CheckpointException) as err:  # a full disk surfaces as torch's zip writer failing
        error = _last_line(err)
    error = first_error(error)  # no rank goes on to the barrier while another failed
    if error is None and dist.get_rank() == 0:
        try:
            manifest = {"step": policy.step, "world_size": dist.get_world_size(), "model": _model_identity(policy),
                        "policy_config": asdict(policy.cfg), "extra": extra or {}}
            for name, value in (attachments or {}).items():
                torch.save(value, tmp / name)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            replace_folder(tmp, final)
            write_atomic(root / LATEST, final.name + "\n")
        except OSError as err:
            error = describe_os_error(err, tmp)
    error = first_error(error)
    if error is not None:
        free = shutil.disk_usage(root).free  # before the partial checkpoint's files are removed
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        raise CheckpointError(f"saving checkpoint {final.name} in {root} failed: {error} (its file system had "
                              f"{free} bytes free); the newest complete checkpoint is "
                              f"{previous.name if previous else 'none'}, left as it was")
    return final


def _last_line(err: BaseException) -> str:
    cause = str(err).strip().splitlines()[-1] if str(err).strip() else ""
    return f"{type(err).__name__}: {cause}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `root/latest` names, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def read_manifest(path: str | Path) -> dict:
    """The manifest of the checkpoint at `path` (model identity, policy config, step); CheckpointError if absent."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a megatron_sapo checkpoint (no {MANIFEST}): incomplete or damaged")
    try:
        return json.loads(manifest_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{manifest_path} is damaged: {err}") from err


def load_checkpoint(policy, path: str | Path, *, model_only: bool = False) -> dict:
    """Load model, optimizer, scheduler, step and (same world size) RNG states into `policy` (collective); return
    the `extra` dict saved with it. model_only: the weights alone (an export needs nothing else)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    manifest = read_manifest(path)
    ours = _model_identity(policy)
    diff = {k: (manifest["model"].get(k), v) for k, v in ours.items() if manifest["model"].get(k) != v}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in sorted(diff.items())[:5])
        raise CheckpointError(f"{path} holds another model ({details})")
    same_world = _same_world(manifest)
    if model_only:
        template = {"model": policy.model.module.sharded_state_dict()}
    else:
        template = _sharded_state(policy, is_loading=True)
        if not same_world:
            template.pop("rng")
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        # no_grad: the distributed optimizer's format loads in place into views of its fp32 master parameters
        with cpu_compat.cuda_as_cpu(), torch.no_grad():
            state = dist_checkpointing.load(template, str(path))
    # dist_checkpointing raises many kinds (torch's CheckpointException is a BaseException); all mean the files
    # cannot be used
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"cannot load {path}: {_last_line(err)}") from err
    policy.model.module.load_state_dict(state["model"])
    if model_only:
        return manifest.get("extra", {})
    if _layout_free_optimizer(policy):
        _restore_optimizer_state(policy, state["optimizer"])
    else:
        with torch.no_grad():
            policy.optimizer.load_state_dict(state["optimizer"])
        _own_step_counters(policy)
    policy.scheduler.load_state_dict(state["scheduler"])
    policy.step = int(state["step"])
    if same_world:
        _set_rng_state(state["rng"])
    return manifest.get("extra", {})


def load_attachment(path: str | Path, name: str, default=None):
    """An attachment saved with the checkpoint at `path` (plain tensors and containers only), or `default`."""
    file = Path(path) / name
    if not file.is_file():
        return default
    try:
        return torch.load(file, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file of any kind
        raise CheckpointError(f"cannot read {file}: {type(err).__name__}: {err}") from err


def _same_world(manifest: dict) -> bool:
    cfg = manifest["policy_config"]
    saved = (cfg["tensor_model_parallel_size"], cfg["pipeline_model_parallel_size"],
             cfg["expert_model_parallel_size"])
    from megatron.core import parallel_state as ps

    now = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
           ps.get_expert_model_parallel_world_size())
    return saved == now and manifest["world_size"] == dist.get_world_size()
