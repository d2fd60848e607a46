"""The checkpointer: when to save, what the loop's state is, how many to keep, and where a restart resumes.

A checkpoint (policy/checkpoint.py: written to a temporary folder and renamed, so a crash leaves the previous one
whole) holds the policy (weights, optimizer, scheduler, RNG) and the loop's state beside it: the RL step, the run
recorder's MLflow run, the rollout side's prompt sampler and, with asynchronous rollouts, the batches generated but
not yet trained on (an attachment). A resumed run therefore neither loses nor repeats a step, nor a prompt.
Every rank calls `resume` and `save` (collectives); rank 0 alone writes the loop state and prunes old checkpoints.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from ..policy.checkpoint import latest_checkpoint, load_attachment, load_checkpoint, save_checkpoint
from ..signals import shielded_children


@dataclass
class Resumed:
    """Where a run starts: step 0 and nothing else, or a checkpoint's step and loop state."""
    step: int = 0
    state: dict = field(default_factory=dict)  # the loop state saved with the checkpoint (rank 0's)
    path: Path | None = None

    def attachment(self, name: str, default=None):
        return default if self.path is None else load_attachment(self.path, name, default)


class Checkpointer:
    def __init__(self, policy, root: Path, *, every: int, keep: int, say=lambda text: None):
        self.policy, self.root, self.every, self.keep, self.say = policy, Path(root), every, keep, say

    def resume(self) -> Resumed:
        """Load the latest checkpoint into the policy (collective), or start from step 0 when there is none."""
        path = latest_checkpoint(self.root)
        if path is None:
            return Resumed()
        self.say(f"resuming from {path}")
        state = load_checkpoint(self.policy, path)
        return Resumed(int(state.get("trainer_step", 0)), state, path)

    def due(self, step: int, *, last: bool, stopping: bool) -> bool:
        return last or stopping or bool(self.every and step % self.every == 0)

    def save(self, step: int, state: dict | None, attachments: dict | None = None) -> Path:
        """Save the policy and the loop state (rank 0's `state` and `attachments`; None elsewhere) as step `step`;
        keep the newest `keep` checkpoints."""
        extra = None if state is None else {"trainer_step": step, **state}
        with shielded_children():  # Megatron's writer starts processes, one of them kept for later saves
            path = save_checkpoint(self.policy, self.root, extra, number=step, attachments=attachments)
        if dist.get_rank() == 0:
            for old in sorted(self.root.glob("step_*"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            self.say(f"checkpoint {path}")
        return path
