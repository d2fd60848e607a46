"""Writing the model as a sharded Hugging Face folder while its tensors stream out (policy/hf_stream.py):
model-0000i-of-0000N.safetensors shards of at most shard_bytes each (a tensor larger than that alone), the
model.safetensors.index.json that maps every tensor to its shard, and the config and tokenizer files of the folder
the model came from: what transformers and SGLang load.

Each pipeline stage's sender writes its own shards, side by side with the other stages. The shards are laid out
before any weight moves, from every sender's plan (names, shapes, dtypes: one all-gather of that metadata), so each
file's safetensors header is written first and the tensors follow in stream order, from the bucket straight to the
file: no shard is ever assembled in memory. Memory on every rank: the stream's bound (policy/hf_stream.py) plus the
plan's metadata (~100 bytes per tensor).

Atomic: everything goes into a staging folder beside OUT, which must be on a file system that every sender sees (as
for SGLang's disk sync); when every sender has flushed its shards, global rank 0 writes the index and renames the
folder into place, so a crash leaves the previous folder (or none), never a partial one. A write error on any rank
(disk full, permissions) is agreed by all ranks, which keep streaming to the end and then raise ExportError naming
the file and the OS error: no rank is left waiting in a collective, and the staging folder is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections import deque
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..atomic import describe_os_error, replace_folder
from .hf_config import HFArchitecture
from .hf_stream import TensorSpec, hf_buckets, sender_stage, stage_plan

INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1000**3  # Hugging Face's default max_shard_size, "5GB"
# Files of a HF folder that an export carries over from the folder the model came from.
CARRIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class ExportError(OSError):
    """Writing an export failed on some rank (disk full, permissions): raised on every rank, naming the file."""


class Shard(NamedTuple):
    file: str
    stage: int
    specs: list[TensorSpec]


def shard_layout(stage_plans: list[tuple[int, list[TensorSpec]]], shard_bytes: int) -> list[Shard]:
    """Cut each stage's plan, in order, into shards of at most `shard_bytes` (a larger tensor alone); a shard never
    spans two stages (each is written by its stage's sender). Files are numbered over all stages in stage order."""
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes!r}")
    cut: list[tuple[int, list[TensorSpec]]] = []
    for stage, plan in sorted(stage_plans, key=lambda entry: entry[0]):
        size = 0
        for spec in plan:
            if not cut or cut[-1][0] != stage or (cut[-1][1] and size + spec.nbytes > shard_bytes):
                cut.append((stage, []))
                size = 0
            cut[-1][1].append(spec)
            size += spec.nbytes
    return [Shard(f"model-{i + 1:05d}-of-{len(cut):05d}.safetensors", stage, specs)
            for i, (stage, specs) in enumerate(cut)]


class ShardWriter:
    """One safetensors file written as its tensors arrive: the header (names, dtypes, shapes, byte offsets) first,
    from the planned specs, then each tensor's bytes, which must come in the planned order with the planned shape
    and dtype. close() flushes the file to disk."""

    def __init__(self, path: Path, specs: list[TensorSpec]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in specs:
            if spec.dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{spec.name}: dtype {spec.dtype} has no safetensors name")
            header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
        self.path, self.pending = path, deque(specs)
        self._file = open(path, "wb")
        try:
            self._file.write(struct.pack("<Q", len(text)) + text)
        except OSError as err:
            self._file.close()
            err.filename = err.filename or str(path)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.pending.popleft() if self.pending else None
        got = TensorSpec(name, tuple(tensor.shape), tensor.dtype)
        if got != expected:
            raise RuntimeError(f"{self.path.name}: the stream gave {got}, the planned layout expects {expected}")
        try:
            self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        except OSError as err:  # name the file: a write error alone says only "No space left on device"
            err.filename = err.filename or str(self.path)
            raise

    def close(self, *, abandon: bool = False) -> None:
        """Flush the file to disk; `abandon` (the export failed elsewhere): just close it."""
        if abandon:
            self._file.close()
            return
        if self.pending:
            raise RuntimeError(f"{self.path.name}: {len(self.pending)} planned tensors never came, e.g. "
                               f"{self.pending[0].name}")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


def write_index(folder: Path, shards: list[Shard]) -> None:
    weight_map = {spec.name: shard.file for shard in shards for spec in shard.specs}
    total = sum(spec.nbytes for shard in shards for spec in shard.specs)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def export_hf(model, arch: HFArchitecture, out_dir: str | Path, source_dir: str | Path, *,
              shard_bytes: int = DEFAULT_SHARD_BYTES, bucket_bytes: int = 512 << 20) -> Path:
    """Write the model as a sharded HF folder at `out_dir` (see the module docstring). Collective: every rank of the
    model calls it; returns when the folder is in place."""
    from .parallel import cpu_world_group, first_error

    out_dir, source_dir = Path(out_dir).resolve(), Path(source_dir)
    group = cpu_world_group()
    stage = sender_stage(model, arch)
    mine = (stage, stage_plan(model, arch) if stage is not None else [])
    plans = [None] * dist.get_world_size()
    dist.all_gather_object(plans, mine, group=group)
    shards = shard_layout([plan for plan in plans if plan[0] is not None], shard_bytes)
    staging = out_dir.parent / f".{out_dir.name}.staging"
    error = None
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
        except OSError as err:
            error = describe_os_error(err, staging)
    error = first_error(error)  # the staging folder exists before any sender writes into it
    writers: deque[ShardWriter] = deque()
    if error is None:
        try:
            writers.extend(ShardWriter(staging / s.file, s.specs) for s in shards if s.stage == stage)
        except OSError as err:
            error = describe_os_error(err, staging)
    for bucket in hf_buckets(model, arch, bucket_bytes):
        if error is not None:
            continue  # this rank still takes part in the stream's gathers
        try:
            for name, tensor in bucket:
                while not writers[0].pending:
                    writers.popleft().close()
                writers[0].write(name, tensor)
        except OSError as err:
            error = describe_os_error(err, writers[0].path if writers else staging)
    try:
        while writers:
            writers.popleft().close(abandon=error is not None)
    except OSError as err:
        error = error or describe_os_error(err, staging)
    error = first_error(error)  # every sender's shards are on disk, or every rank stops here
    if error is None and dist.get_rank() == 0:
        try:
            write_index(staging, shards)
            for name in CARRIED_FILES:
                if (source_dir / name).is_file():
                    shutil.copy2(source_dir / name, staging / name)
            replace_folder(staging, out_dir)
        except OSError as err:
            error = describe_os_error(err, staging)
    error = first_error(error)
    if error is not None:
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"exporting the weights to {out_dir} failed, the previous folder is left as it was: "
                          f"{error}")
    return out_dir
