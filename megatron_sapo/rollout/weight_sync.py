"""Weight sync by broadcast: a trainer process streams Hugging Face-named tensors straight into every SGLang server's
model over a torch process group (NCCL on GPU clusters, gloo on CPU), with nothing written to disk. The disk path
(SGLangEngine.update_weights) stays the simple default; this one saves writing and re-reading the whole model. With
pipeline parallelism each stage's sender forms a group of its own with the servers (a distinct group_name) and
sends its stage's tensors inside one update session that a single process opens and closes (loop/publisher.py).

Forming the group (WeightUpdateGroup(...), once): the sending process is rank 0; server i's TP workers take ranks
offset_i .. offset_i + tp_i - 1. Inside POST /init_weights_update_group SGLang builds its side as a TCPStore client at
master_address:master_port, wrapped in PrefixStore(group_name), handed to torch's private _new_process_group_helper
(a new group beside the server's default one). The trainer builds the same chain, hosting the store, so the store
keys meet (the default group, or any other prefix, gives other keys and the rendezvous never completes); the POST only
returns once the group is formed, so it runs on a thread while the trainer joins. Cost: one TCPStore rendezvous, then
a gloo full mesh or one NCCL communicator init.

Forming ends with one warm-up collective (the smallest served tensor, sent with its served value): NCCL creates
communicators at the first collective, so a group that cannot carry data fails inside the formation timeout, where the
trainer falls back to a folder, instead of at the first real bucket.

An update (update(named_tensors, version) for a single sender; open_session / send / close_session when several
senders share the session): POST /begin_weight_update to each server; then, per bucket (consecutive
tensors of one dtype, at most bucket_bytes unless one tensor alone is larger), one POST
/update_weights_from_distributed per server with the names, dtypes and shapes, and ONE broadcast of the bucket's bytes
from rank 0 (SGLang's "flattened_bucket" format); the last bucket also sets weight_version and flushes the cache; then
POST /end_weight_update. Cost: the model's bytes once through the broadcast (every server worker receives the full
tensors and keeps its TP shard); one collective per bucket; per server, one HTTP call per bucket plus two; the trainer
holds two buckets (one staged while the previous one is sent) plus a flat copy of the bucket in flight.

Checks: SGLang ignores unknown names silently (and an update with wrong shapes has killed it), so each bucket's names
and shapes are checked against the safetensors of the served folder (the first server's /model_info model_path, or
`reference_dir`) before it is sent. The trainer waits on the servers' HTTP answers, not on the collective, so a
refusal (success false), a server that does not answer, or a group not formed within `timeout` is at once an
SGLangError naming the server and the master address:port. A failed transfer leaves the group unusable: close it
(which tries to close the servers' update session and group) and form a new one; a restarted server has lost its
membership too, and a server still waiting for the bytes of a failed transfer needs a restart. A server that cannot
reach the master, or whose peers never join, stays blocked in SGLang's rendezvous until SGLang's own timeout (30 min),
which its API does not let us shorten.
"""

from __future__ import annotations

import datetime
import math
import urllib.error
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from ..buckets import NamedTensors, buckets
from .sglang import SGLangError, _control, _get_json

BACKENDS = ("nccl", "gloo")


def served_shapes(model_dir: str | Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a Hugging Face folder's safetensors (headers only, no tensor data is read)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors in {model_dir} to check tensor names and shapes against")
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = list(f.get_slice(name).get_shape())
    return shapes


class WeightUpdateGroup:
    """The trainer's (rank 0's) side of a weight-update process group with every worker of the SGLang servers at
    `urls`. Forming it is collective with the servers; use it as a context manager or call close()."""

    def __init__(self, urls: list[str], *, master_address: str, master_port: int = 0, backend: str = "nccl",
                 group_name: str = "megatron_sapo_weights", bucket_bytes: int = 512 << 20, timeout: float = 300.0,
                 reference_dir: str | Path | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not urls:
            raise ValueError("WeightUpdateGroup needs at least one server URL")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes!r}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs a CUDA device on the trainer; use 'gloo' on CPU")
        if dist.is_initialized() and c10d._get_default_group().bound_device_id is not None:
            # torch would then build the new group by splitting the default one, which the servers are not part of
            raise ValueError("the trainer's default process group is bound to a device (init_process_group(device_id="
                             "...)); create it without device_id to form a weight-update group beside it")
        if group_name in c10d._world.pg_names.values():
            raise ValueError(f"a process group named {group_name!r} already exists in this process")
        self.urls = [url.rstrip("/") for url in urls]
        self.group_name, self.backend, self.bucket_bytes, self.timeout = group_name, backend, bucket_bytes, timeout
        asked = min(30.0, timeout)  # a server that does not answer these is hung: the caller falls back to a folder
        self.reference_dir = str(reference_dir or _get_json(self.urls[0] + "/model_info", asked)["model_path"])
        self.shapes = served_shapes(self.reference_dir)
        offsets, rank = [], 1
        for url in self.urls:
            info = _get_json(url + "/server_info", asked)
            if info.get("dp_size", 1) != 1 or info.get("pp_size", 1) != 1:
                raise SGLangError(f"{url} runs dp_size {info.get('dp_size')}, pp_size {info.get('pp_size')}: SGLang "
                                  "joins weight-update groups only with dp_size 1 and pp_size 1")
            offsets.append(rank)
            rank += info["tp_size"]
        self.world_size = rank
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.broken: str | None = None  # why the group can no longer be used
        self._aborted = False
        self._group = None

        span = datetime.timedelta(seconds=timeout)
        # hosted here rather than through a tcp:// rendezvous, which under torchrun joins the agent's store instead;
        # port 0 lets the OS pick a free port, which the servers learn from the POST
        self._store = dist.TCPStore(master_address, master_port, self.world_size, is_master=True, timeout=span,
                                    wait_for_workers=False)
        self.master = f"{master_address}:{self._store.port}"
        self._pool = ThreadPoolExecutor(max_workers=len(self.urls) + 1, thread_name_prefix="weight-sync")
        joined = self._pool.submit(c10d._new_process_group_helper, self.world_size, 0, [], c10d.Backend(backend),
                                   c10d.PrefixStore(group_name, self._store), group_name=group_name, timeout=span)
        request = {"master_address": master_address, "master_port": self._store.port, "world_size": self.world_size,
                   "group_name": group_name, "backend": backend}
        answers = {self._pool.submit(_control, url, "/init_weights_update_group", {**request, "rank_offset": offset},
                                     timeout): url for url, offset in zip(self.urls, offsets)}
        answers[joined] = "the trainer"
        try:
            self._await(answers, "forming")
        except SGLangError:
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise
        self._group = joined.result()[0]
        # destroy_process_group looks the group up here: this process is the group's rank 0
        c10d._world.pg_group_ranks[self._group] = {dist.get_rank() if dist.is_initialized() else 0: 0}
        try:
            self._warm_up()
        except (SGLangError, ValueError) as err:
            self.broken = self.broken or f"the warm-up failed: {err}"  # closing is then best effort
            self.close()
            raise

    def _warm_up(self) -> None:
        """One collective while forming, so that a group that cannot carry data fails here, inside the formation
        timeout, and the caller falls back to a folder. NCCL creates its communicator at the first collective on
        both sides (SGLang builds its side without device_id; an eager, device_id-bound side here would block in
        the communicator's init until the servers' first collective, i.e. forever): without this, that first
        collective would be the first real bucket. The smallest served tensor is sent with the value the servers
        already hold (read from the served folder), under no new version, in its own update session."""
        from safetensors import safe_open

        name = min(self.shapes, key=lambda k: (math.prod(self.shapes[k]), k))
        for path in sorted(Path(self.reference_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                if name in f.keys():
                    tensor = f.get_tensor(name)
                    break
        self._control_all("/begin_weight_update", {}, "opening the warm-up update in")
        try:
            self._send([(name, tensor)], None)
        finally:
            self._control_all("/end_weight_update", {}, "closing the warm-up update in",
                              best_effort=self.broken is not None)

    def _await(self, answers: dict, doing: str) -> None:
        """Wait for every future of `answers` (future -> who), raising at the first failure."""
        what = (f"{doing} weight-update group {self.group_name!r} (trainer = rank 0 of {self.world_size} at "
                f"{self.master}, backend {self.backend})")

        def failed(why: str) -> SGLangError:
            pending = [who for future, who in answers.items() if not future.done()]
            return SGLangError(f"{what}: {why}" + (f"; no answer yet from {', '.join(pending)}" if pending else ""))

        try:
            for future in as_completed(answers, timeout=self.timeout + 30):
                who = answers[future]
                try:
                    future.result()
                except SGLangError as err:
                    raise failed(str(err)) from None
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
                    if isinstance(getattr(err, "reason", err), TimeoutError):
                        raise failed(f"{who} did not answer within {self.timeout:.0f} s") from None
                    raise failed(f"{who} is unreachable: {err}") from None
                except Exception as err:  # the trainer's own side: torch's store / backend errors
                    raise failed(f"{who} failed: {err}") from err
        except TimeoutError:
            raise failed(f"not done within {self.timeout:.0f} s") from None

    def _control_all(self, endpoint: str, payload: dict, doing: str, *, best_effort: bool = False) -> None:
        answers = {self._pool.submit(_control, url, endpoint, payload, 10.0 if best_effort else self.timeout): url
                   for url in self.urls}
        if best_effort:  # after a failed transfer, a server still waiting for its bytes cannot answer
            wait(answers, timeout=15.0)
            return
        try:
            self._await(answers, doing)
        except SGLangError as err:  # a server that failed a control call (died, hung) leaves the group unusable
            self.broken = self.broken or str(err)
            raise

    def open_session(self) -> None:
        """Open an update session on every server (SGLang takes weights only between its begin and end calls); one
        session may carry the tensors of several groups (one per pipeline stage's sender)."""
        self._check_usable()
        self._control_all("/begin_weight_update", {}, "opening an update in")

    def _check_usable(self) -> None:
        if self._group is None or self.broken is not None:
            state = "closed" if self._group is None else f"unusable: {self.broken}"
            raise SGLangError(f"weight-update group {self.group_name!r} is {state}")

    def close_session(self, *, best_effort: bool = False) -> None:
        """Close the servers' update session (best effort: after a failed transfer, this group's or another's)."""
        self._control_all("/end_weight_update", {}, "closing an update in",
                          best_effort=best_effort or self.broken is not None)

    def send(self, named_tensors: NamedTensors, version: str | None = None, *, sent_before: int = 0) -> int:
        """Load (name, tensor) pairs, Hugging Face names as in the served safetensors, on every server, inside an
        open session (of this group or another's), in buckets of at most bucket_bytes; `version` (on the last bucket)
        sets the servers' weight version and flushes their cache. Returns how many tensors were sent. Checked against
        the served model before anything moves; `sent_before` (tensors of this update already loaded) only makes the
        error say that the servers now hold a partial update."""
        self._check_usable()
        parts = list(buckets(named_tensors, self.bucket_bytes))
        for part in parts:
            self._check(part, sent_before)
        for i, part in enumerate(parts):
            self._send(part, version if i == len(parts) - 1 else None)
        return sum(len(part) for part in parts)

    def update(self, named_tensors: NamedTensors, version: str) -> None:
        """One sender's whole update: open a session, send every (name, tensor) pair (a generator is consumed as
        it goes: two buckets are held at a time), the last bucket with `version`, close the session."""
        self.open_session()
        sent, staged = 0, None
        try:
            for bucket in buckets(named_tensors, self.bucket_bytes):
                if staged is not None:
                    sent += self.send(staged, sent_before=sent)
                staged = bucket
            if staged is None:
                raise ValueError("no tensors to send")
            self.send(staged, version, sent_before=sent)
        finally:
            self.close_session()

    def _check(self, bucket: list[tuple[str, torch.Tensor]], sent: int) -> None:
        partial = (f"; {sent} tensors were already loaded: the servers hold a partial update under the old version"
                   if sent else "")
        for name, tensor in bucket:
            expected = self.shapes.get(name)
            if expected is None:
                raise ValueError(f"{name!r} is not a tensor of the served model ({self.reference_dir}); SGLang would "
                                 f"ignore it silently{partial}")
            if list(tensor.shape) != expected:
                raise ValueError(f"{name!r} has shape {list(tensor.shape)}, the served model's is {expected}{partial}")

    def _send(self, bucket: list[tuple[str, torch.Tensor]], version: str | None) -> None:
        """One bucket: the metadata over HTTP to each server, the bytes in one broadcast from rank 0."""
        payload = {"names": [name for name, _ in bucket],
                   "dtypes": [str(tensor.dtype).removeprefix("torch.") for _, tensor in bucket],
                   "shapes": [list(tensor.shape) for _, tensor in bucket], "group_name": self.group_name,
                   "load_format": "flattened_bucket", "weight_version": version, "flush_cache": version is not None}
        flat = torch.cat([tensor.detach().to(self.device).contiguous().view(-1).view(torch.uint8)
                          for _, tensor in bucket])
        answers = {self._pool.submit(_control, url, "/update_weights_from_distributed", payload, self.timeout): url
                   for url in self.urls}
        work = dist.broadcast(flat, group=self._group, group_src=0, async_op=True)
        try:
            self._await(answers, "sending weights through")
        except SGLangError as err:
            self.broken = str(err)
            self._abort()
            raise
        work.wait()

    def _abort(self) -> None:
        """After a refused bucket the servers never join its broadcast: an NCCL broadcast would stay queued on the
        stream until the watchdog kills the trainer, so the communicator is aborted at once (the group is unusable
        anyway). A gloo broadcast from rank 0 does not wait for its receivers, and gloo has no abort."""
        if self.backend != "nccl" or self._group is None:
            return
        try:
            c10d._abort_process_group(self._group)
        except Exception as err:  # torch's private API: report, but the caller's error is the one that matters
            self.broken += f" (aborting the NCCL communicator failed too: {err})"
        self._aborted = True

    def close(self, *, best_effort: bool = False) -> None:
        """Destroy the group on the servers (best effort after a failed transfer, or when asked: a restarted server
        no longer has it) and here."""
        if self._group is None:
            return
        try:
            self._control_all("/destroy_weights_update_group", {"group_name": self.group_name}, "destroying",
                              best_effort=best_effort or self.broken is not None)
        finally:
            if not self._aborted:  # an aborted group is already gone from torch's registry
                dist.destroy_process_group(self._group)
            self._group = None
            self._pool.shutdown(wait=False)

    def __enter__(self) -> WeightUpdateGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
