"""Writing a file so that a crash leaves either its old content or the new one, never a part of it: the data goes to
a temporary file beside it (same folder, so the same file system), which is then renamed over it (os.replace is
atomic on POSIX). Config copies, the checkpoint pointer, plots, datasets and the tracker's files go through here."""

from __future__ import annotations

import os
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
