"""The weight publisher: the one owner of the weights the rollout engine serves.

After each RL step the policy's weights reach the engine under the version str(step), by one of two transports:
- disk (the embedded engine; SGLang with rollout.sglang.weight_sync = disk): the policy is exported as a versioned,
  sharded Hugging Face folder weights/step_XXXXXXXX (policy/hf_export.py: each pipeline stage's sender writes its
  own shards as the tensors stream, atomically) and the engine loads it; the two newest folders are kept (a restarted
  SGLang server reloads the newest).
- distributed (SGLang): each pipeline stage's sender (policy/hf_stream.py) forms a weight-update group of its own with
  the servers (rollout/weight_sync.py) and streams its stage's buckets straight into them, so every stage's weights
  arrive and no rank holds more than the stream's bound. Global rank 0 opens one update session on the servers, the
  stages send side by side, and rank 0's last bucket, sent after every stage has finished, sets the new version and
  flushes the servers' cache: a generation never sees a mix of versions under the new tag. When any sender fails,
  every rank agrees on it, the groups are closed, this step syncs through a folder, and the groups are formed anew at
  the next publish; so are they after the engine restarted a server (which loses its membership), rank 0 telling
  every rank at each publish (one small broadcast). A server restarted between publishes comes back with the newest
  folder's weights, not the broadcast ones, until the next publish (the engine warns; rollout/stale_frac counts it).
The engine is updated through the rollout side, which decides when it may change weights (with asynchronous
rollouts it waits until the batches the old weights are due to generate are done); every rank takes part then
(rank 0 with the engine, the others without).

Memory: the stream's bound on every rank (one bucket being filled on a sender, one in flight to the servers), never
the model; on the disk path the same, with the bucket written to its shard instead.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from ..policy.hf_stream import sender_stage
from ..policy.parallel import cpu_world_group, first_error

KEEP_FOLDERS = 2
GROUP_NAME = "megatron_sapo_weights"


class WeightPublisher:
    def __init__(self, policy, cfg, out: Path, *, say=lambda text: None):
        self.policy, self.cfg, self.say = policy, cfg, say
        self.root = Path(out) / "weights"
        self.folder: Path | None = None  # the newest exported folder (rank 0's engine loads from here)
        self.group = None  # this rank's weight-update group with the servers (senders only), formed at first use
        self.formed = False  # every sender has its group
        self.restarts_seen = 0  # the engine's server restarts at the last publish (distributed sync)
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
        if self.distributed:
            return rollouts.load_weights(step, lambda engine: self._stream(engine, step))
        folder = self.export(step)
        return rollouts.load_weights(step, lambda engine: self._load_folder(engine, folder, step))

    @staticmethod
    def _load_folder(engine, folder: Path, step: int) -> None:
        if engine is not None:  # rank 0
            engine.update_weights(folder, str(step))

    # ---- the distributed transport (every rank; `engine` on rank 0 only) -------------------------------------------

    def _stream(self, engine, step: int) -> None:
        from ..rollout.sglang import SGLangError

        # a server restarted since the last publish (a crash or a hang) has lost its group membership: form anew
        restarts = [engine.stats["restarts"] if engine is not None else None]
        dist.broadcast_object_list(restarts, src=0, group=cpu_world_group())
        if restarts[0] != self.restarts_seen:
            self.restarts_seen = restarts[0]
            self.close(best_effort=True)
        try:
            self._form_groups(engine)
            if dist.get_rank() == 0:
                self.group.open_session()
            opened = None
        except SGLangError as err:
            opened = str(err)
        failed = first_error(opened)  # the session is open before any stage sends
        if failed is None:
            failed = self._send_stages(step)
        if failed is not None:
            self.say(f"distributed weight sync failed ({failed}); syncing through a folder this step")
            self.close()
            self._load_folder(engine, self.export(step), step)
        elif engine is not None:
            engine.note_version(str(step))

    def _send_stages(self, step: int) -> str | None:
        """Every sender streams its stage; rank 0 keeps its last bucket back and sends it, with the version, once
        every stage is done. Returns the agreed transport failure, if any; a tensor the served model does not have
        (ValueError: another model is served) is raised on every rank."""
        from ..rollout.sglang import SGLangError

        main, error, mismatch, held, sent = dist.get_rank() == 0, None, None, None, 0
        for bucket in self.policy.hf_buckets(self.cfg.rollout.sglang.bucket_mb << 20):
            if error is not None or mismatch is not None:
                continue  # keep taking part in the stream's gathers
            try:
                if main and held is not None:
                    sent += self.group.send(held, sent_before=sent)
                if main:
                    held = bucket
                else:
                    sent += self.group.send(bucket, sent_before=sent)
            except SGLangError as err:
                error = str(err)
            except ValueError as err:
                mismatch = str(err)
        mismatch = first_error(mismatch)
        failed = first_error(error)
        if main:
            try:
                if failed is None and mismatch is None:
                    self.group.send(held, str(step), sent_before=sent)
            except SGLangError as err:
                failed = str(err)
            finally:
                self.group.close_session(best_effort=failed is not None or mismatch is not None)
        if mismatch is not None:
            raise ValueError(f"distributed weight sync: {mismatch}")
        return first_error(failed)

    def _form_groups(self, engine) -> None:
        """Each sender forms its group with the servers, one stage after another (a server forms one group at a
        time, and each formation opens its own warm-up session)."""
        from ..rollout.sglang import SGLangError

        if self.formed:
            return
        box = [(engine.urls, socket.gethostname()) if engine is not None else None]
        dist.broadcast_object_list(box, src=0, group=cpu_world_group())
        urls, main_host = box[0]
        mine, error = sender_stage(self.policy.module, self.policy.arch), None
        stages = [None] * dist.get_world_size()
        dist.all_gather_object(stages, mine, group=cpu_world_group())
        for stage in sorted(s for s in stages if s is not None):
            if mine == stage and error is None:
                try:
                    self.group = self._form_group(urls, stage, main_host)
                except SGLangError as err:
                    error = str(err)
            error = first_error(error)
        if error:
            raise SGLangError(error)
        self.formed = True

    def _form_group(self, urls: list[str], stage: int, main_host: str):
        from ..rollout.weight_sync import WeightUpdateGroup

        sc = self.cfg.rollout.sglang
        address = sc.master_address or os.environ.get("MASTER_ADDR", "127.0.0.1")
        if socket.gethostname() != main_host:  # a sender on another node: the servers reach it at its own address
            address = socket.gethostbyname(socket.gethostname())
        return WeightUpdateGroup(urls, master_address=address, backend="nccl" if torch.cuda.is_available() else "gloo",
                                 group_name=f"{GROUP_NAME}_pp{stage}", bucket_bytes=sc.bucket_mb << 20,
                                 timeout=sc.update_timeout_s, reference_dir=self.folder)

    def _prune(self) -> None:
        for old in sorted(self.root.glob("step_*"))[:-KEEP_FOLDERS]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self, *, best_effort: bool = False) -> None:
        """Close this rank's group, if any (not collective: each sender closes its own); best_effort: a server may
        have lost it (restarted), so its refusal is no error."""
        if self.group is not None:
            self.group.close(best_effort=best_effort)
            self.group = None
        self.formed = False
