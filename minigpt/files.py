"""Writing files so that a crash never leaves half of one.

Every file and directory is written atomically: first under a temporary name, flushed to disk
(fsync), then renamed into place. A rename is atomic on POSIX file systems, so a crash, a
`kill -9` or a power cut at any instant leaves either the old version or the new one, never
half of a file. Everything in MiniGPT that writes a file goes through here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

TEMPORARY_PREFIX = ".tmp-"  # a name that nothing reads: what an interrupted write leaves behind


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (the directory entry itself is data too)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows); the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old content or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_directory_atomically(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create directory `path` by letting `fill` write into a temporary sibling, then renaming it.

    If `path` already exists it is replaced; at every instant one complete version exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{path.name}-", dir=path.parent))
    try:
        fill(temporary)
        for file in temporary.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(temporary)
        if path.exists():
            retired = path.parent / f"{TEMPORARY_PREFIX}old-{path.name}-{os.getpid()}"
            os.replace(path, retired)
            os.replace(temporary, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync_directory(path.parent)
    return path


def remove_temporary_files(run_dir: str | Path) -> None:
    """Clear what an interrupted write left behind (it never has a final name, so nothing reads it)."""
    for leftover in Path(run_dir).glob(f"{TEMPORARY_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
