"""Writing a file so that a crash leaves either its old content or the new one, never a part of it: the data goes to
a temporary file beside it (same folder, so the same file system), which is then renamed over it (os.replace is
atomic on POSIX). Config copies, the checkpoint pointer, plots, datasets and the tracker's files go through here;
whole folders (checkpoints, weight exports) are written beside their place and put there by `replace_folder`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)
    return path


def replace_folder(finished: Path, target: Path) -> None:
    """Put the complete folder `finished` (on the same file system) at `target`: an older `target` is moved aside
    first, then removed, so the path holds the old folder or the new one, never a mix."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    finished.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def describe_os_error(err: OSError, path: str | Path) -> str:
    """'PATH: reason' for a failed write; a write error alone says only "No space left on device"."""
    return f"{err.filename or path}: {err.strerror or err}"
