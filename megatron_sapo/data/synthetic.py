"""The bundled synthetic task of the CPU demo: sort four digits ("3142:" -> "1234"). A tiny model learns it by RL
within minutes on a laptop CPU (../shared/ENVIRONMENT.md measured +0.5 to +0.77 reward over 100-200 SAPO steps
after a short supervised warm start); the reward is 1 only if the whole answer is right."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..atomic import write_atomic

DIGITS = 4


def sort_digits_examples(count: int, *, seed: int = 0) -> list[dict]:
    """`count` rows {"prompt": "3142:", "answer": "1234"}; the same seed gives the same rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        digits = [str(rng.randrange(10)) for _ in range(DIGITS)]
        rows.append({"prompt": "".join(digits) + ":", "answer": "".join(sorted(digits))})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSONL atomically (temporary file + rename)."""
    return write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
