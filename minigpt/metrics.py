"""The run's record: `metrics.jsonl`, one JSON object per line, only ever appended to.

Appending whole lines and flushing after each keeps the file readable while the run writes it:
a reader (the monitor, the plot script) may at worst see a truncated last line, which
`read_metrics` skips.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from minigpt.files import atomic_write_bytes


ROW_KEYS = ("type", "step", "tokens")  # where a row is, not what was measured


def evaluation_scalars(row: dict[str, Any]) -> dict[str, float]:
    """Every number an evaluation row holds: whatever metrics the run's objective reports."""
    return {name: value for name, value in row.items()
            if name not in ROW_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)}


def encode_row(row: dict[str, Any]) -> str:
    """One JSON line. NaN and infinity are not JSON: they are written as "nan", "inf", "-inf"."""
    safe = {key: str(value) if isinstance(value, float) and not math.isfinite(value) else value for key, value in row.items()}
    return json.dumps(safe) + "\n"


class MetricsWriter:
    """Appends rows to metrics.jsonl, flushing each so readers see it at once. A writer that is
    not `enabled` (a process other than rank 0 under torchrun) opens nothing and writes nothing."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(encode_row(row))
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete rows of a metrics.jsonl; a missing file gives no rows, a torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append({key: float(value) if value in ("nan", "inf", "-inf") else value for key, value in row.items()})
    return rows


def truncate_metrics(path: str | Path, last_step: int) -> list[dict[str, Any]]:
    """Drop rows logged after `last_step` (by a run that died after its last checkpoint); return the rest.

    A resumed run logs those steps again, so keeping them would record each twice.
    """
    rows = [row for row in read_metrics(path) if row.get("step", 0) <= last_step]
    atomic_write_bytes(path, "".join(encode_row(row) for row in rows).encode("utf-8"))
    return rows
