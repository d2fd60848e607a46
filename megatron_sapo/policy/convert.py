"""A training checkpoint -> a Hugging Face folder (`megatron-sapo export`), through the same streaming path as the
trainer's own exports (policy/hf_export.py): in one process, or under torchrun / srun in any layout (given as policy.*
overrides; the checkpoint reloads under any TP / PP / EP), the run's model rebuilt from the checkpoint's manifest,
its weights loaded alone (no optimizer state), then streamed into sharded safetensors.

Memory per rank: this rank's parameters and their gradient buffer (the policy as the trainer builds it), plus the
stream's bound; never the whole model, unless one process holds it.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from .checkpoint import latest_checkpoint, load_checkpoint, read_manifest
from .config import PolicyConfig


def find_checkpoint(output_dir: str | Path, checkpoint: str | Path | None) -> Path:
    """The checkpoint to export: `checkpoint` if given, else the newest one of the run at `output_dir`."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_dir():
            raise ValueError(f"--checkpoint {path}: no such checkpoint folder")
        return path
    root = Path(output_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: no such run folder")
    path = latest_checkpoint(root / "checkpoints")
    if path is None:
        raise ValueError(f"{root} holds no checkpoint (no checkpoints/latest): give the output_dir of a run that saved "
                         "one, or --checkpoint PATH")
    return path


def policy_config(manifest: dict, overrides: dict[str, object]) -> PolicyConfig:
    """The run's policy config from the checkpoint manifest, its layout reset to one process, then `overrides`
    (policy.* keys without the prefix)."""
    known = {f.name for f in fields(PolicyConfig)}
    saved = {k: v for k, v in manifest["policy_config"].items() if k in known}
    saved.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
                 expert_tensor_parallel_size=None, use_distributed_optimizer=False)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown policy option(s) {', '.join('policy.' + k for k in unknown)}")
    cfg = PolicyConfig(**{**saved, **overrides})
    if not (Path(cfg.model_path) / "config.json").is_file():
        raise ValueError(f"the run's model folder {cfg.model_path} (for its config and tokenizer) is gone: give "
                         "policy.model_path=FOLDER, any HF folder of the same model (e.g. the run's weights/step_*)")
    return cfg


def export_checkpoint(output_dir: str | Path, hf_out: str | Path, *, checkpoint: str | Path | None = None,
                      overrides: dict[str, object] | None = None, say=print) -> Path:
    """Export a run's checkpoint as a HF folder at `hf_out` (collective over the processes of this job)."""
    import torch.distributed as dist

    from . import parallel
    from .policy import Policy

    path = find_checkpoint(output_dir, checkpoint)
    hf_out = Path(hf_out)
    if hf_out.exists() and (not hf_out.is_dir() or any(hf_out.iterdir())) and not (hf_out / "config.json").is_file():
        raise ValueError(f"{hf_out} exists and is not a HF folder: an export replaces its target, so give a new or "
                         "empty folder")
    cfg = policy_config(read_manifest(path), overrides or {})
    parallel.init_distributed()
    main = dist.get_rank() == 0
    if main:
        say(f"exporting {path} ({dist.get_world_size()} processes, model from {cfg.model_path})")
    policy = Policy(cfg)
    load_checkpoint(policy, path, model_only=True)
    out = policy.export_hf(hf_out)
    if main:
        say(f"wrote {out}")
    return out

