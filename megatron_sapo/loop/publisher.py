"""The weight publisher: the one owner of the weights the rollout engine serves.

After each RL step the policy's weights reach the engine under the version str(step), by one of two transports:
- disk (the embedded engine; SGLang with rollout.sglang.weight_sync = disk): the policy is exported as a versioned
  Hugging Face folder weights/step_XXXXXXXX (collective: every rank gathers to rank 0, which writes it atomically)
  and the engine loads it; the two newest folders are kept (a restarted SGLang server reloads the newest).
- distributed (SGLang): the full HF state dict is gathered on rank 0 and broadcast to the servers over a process
  group in buckets (rollout/weight_sync.py); when the group fails, this step falls back to a folder and the group is
  formed anew at the next publish.
The engine is updated through the rollout side, which decides when it may change weights (with asynchronous
rollouts it waits until the batches the old weights are due to generate are done).

Memory: both transports hold the full model's HF tensors on rank 0 for the length of the publish (fp32 on the CPU
recipes; the policy's dtype otherwise); the other ranks hold only their shards.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..policy.hf_weights import write_hf_folder

KEEP_FOLDERS = 2


class WeightPublisher:
    def __init__(self, policy, cfg, out: Path, *, say=lambda text: None):
        self.policy, self.cfg, self.say = policy, cfg, say
        self.root = Path(out) / "weights"
        self.folder: Path | None = None  # the newest exported folder (rank 0's engine loads from here)
        self.group = None  # the distributed transport's process group with the servers, formed at the first use
        sc = cfg.rollout.sglang
        self.distributed = cfg.rollout.engine == "sglang" and sc.weight_sync == "distributed"

    def export(self, step: int) -> Path:
        """Write the policy's weights as weights/step_XXXXXXXX (collective); keep the newest two folders."""
        folder = self.root / f"step_{step:08d}"
        self.policy.export_hf(folder)
        if dist.get_rank() == 0:
            self._prune()
        self.folder = folder
        return folder

    def publish(self, step: int, rollouts) -> float:
        """Hand the weights after `step` RL steps to the engine as version str(step) (collective); returns the
        seconds spent waiting for the engine to be free for them."""
        if not self.distributed:
            folder = self.export(step)
            return rollouts.load_weights(step, lambda engine: engine.update_weights(folder, str(step)))
        state = self.policy.hf_state_dict()  # collective; the full tensors on rank 0
        return rollouts.load_weights(step, lambda engine: self._broadcast(engine, state, step))

    def _broadcast(self, engine, state: dict, step: int) -> None:
        from ..rollout.sglang import SGLangError

        try:
            if self.group is None:
                self.group = self._form_group(engine)
            self.group.update(state.items(), str(step))
            return
        except SGLangError as err:
            self.say(f"distributed weight sync failed ({err}); syncing through a folder this step")
            self.close()
        self.folder = self.root / f"step_{step:08d}"
        write_hf_folder(state, self.folder, self.cfg.policy.model_path)
        self._prune()
        engine.update_weights(self.folder, str(step))

    def _form_group(self, engine):
        from ..rollout.weight_sync import WeightUpdateGroup

        sc = self.cfg.rollout.sglang
        return WeightUpdateGroup(engine.urls, master_address=sc.master_address or os.environ.get(
            "MASTER_ADDR", "127.0.0.1"), backend="nccl" if torch.cuda.is_available() else "gloo",
            bucket_bytes=sc.bucket_mb << 20, reference_dir=self.folder)

    def _prune(self) -> None:
        for old in sorted(self.root.glob("step_*"))[:-KEEP_FOLDERS]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
