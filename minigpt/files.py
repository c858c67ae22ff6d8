"""Writing files so that a crash never leaves half of one, and noticing when one was damaged later.

Every file and directory is written atomically: first under a temporary name, flushed to disk
(fsync), then renamed into place. A rename is atomic on POSIX file systems: the directory entry
points at the old file or at the new one, and no reader (and no crash, `kill -9` or power cut)
can catch it halfway. So an interrupted write leaves the old version or the new one, never half
of a file, and the only debris is a temporary name that nothing reads. Everything in MiniGPT
that writes a file goes through here.

Atomic writes protect against crashes *while writing*. A file can still be damaged *afterwards*:
a disk sector goes bad, a copy to another machine is cut short, a sync tool truncates it. So a
directory that must be trusted later (a checkpoint, final_model/) also gets a manifest: the size
and SHA-256 sum of each of its files, written last, and checked before the directory is loaded.

Three more guards live here: a full disk is reported in one sentence after removing the partial
write; a lock file keeps two trainers out of one run directory; and names that would escape the
output directory (`../../etc`) are refused.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import torch

from minigpt.errors import RunFailure, UserInputError

log = logging.getLogger("minigpt.files")

TEMPORARY_PREFIX = ".tmp-"  # a name that nothing reads: what an interrupted write leaves behind
MANIFEST_NAME = "manifest.json"
LOCK_NAME = "run.lock"
FAULT_POINT_VARIABLE = "MINIGPT_FAULT_POINT"
FAULT_RANK_VARIABLE = "MINIGPT_FAULT_RANK"
FAULT_RAISE_VARIABLE = "MINIGPT_FAULT_RAISE"
# What MINIGPT_FAULT_RAISE may ask a fault point to raise instead of killing the process.
FAULT_EXCEPTIONS: dict[str, type[Exception]] = {"out_of_memory": torch.OutOfMemoryError, "error": RuntimeError}
# ... or, instead of raising: stop the launcher (torchrun's agent, this process's parent) as a user would.
FAULT_SIGTERM_LAUNCHER = "sigterm_launcher"

_fault_point_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A test hook: kill this very process (SIGKILL, no clean-up at all) if the environment asks.

    `MINIGPT_FAULT_POINT=before_rename` kills at the first pass through `fault_point("before_rename")`,
    `before_rename@3` at the third. The fault drill (benchmarks/fault_drill.py) crashes training
    at the instants where a crash does most harm: `after_weights` (a checkpoint half written),
    `before_rename` (written but not yet in place), `after_rename_before_prune` (in place, old
    ones not yet pruned) and `during_prune` (an old checkpoint renamed away but not yet deleted);
    `between_renames` kills a folder's replacement after the old version is set aside and before
    the new one is in place (tests/faults/test_file_system.py).
    The trainer passes `training_step` after each micro-batch's forward pass.

    Two more variables shape the fault, for drills of one process failing among several under
    torchrun: `MINIGPT_FAULT_RANK=1` faults only in the process of rank 1, and
    `MINIGPT_FAULT_RAISE=out_of_memory` (or `error`) raises torch.OutOfMemoryError (or a
    RuntimeError) there instead of killing. `MINIGPT_FAULT_RAISE=sigterm_launcher` sends SIGTERM to
    the process's parent, torchrun's agent, and waits until the agent has passed a signal on to this
    process: a stop requested at an exact step, whatever the machine's speed. Without the variables
    (always, outside tests) this costs one dictionary lookup.
    """
    wanted = os.environ.get(FAULT_POINT_VARIABLE)
    if not wanted:
        return
    point, _, count = wanted.partition("@")
    rank = os.environ.get("RANK", "0")  # torchrun's; 0 in a single process
    if point != name or os.environ.get(FAULT_RANK_VARIABLE, rank) != rank:
        return
    _fault_point_passes[name] = _fault_point_passes.get(name, 0) + 1
    if _fault_point_passes[name] < int(count or 1):
        return
    failure = os.environ.get(FAULT_RAISE_VARIABLE)
    if failure == FAULT_SIGTERM_LAUNCHER:
        _sigterm_launcher_and_wait()
        return
    if failure:
        raise FAULT_EXCEPTIONS[failure](f"{failure} injected by {FAULT_POINT_VARIABLE}={wanted} in the process of rank {rank}")
    os.kill(os.getpid(), signal.SIGKILL)


def _sigterm_launcher_and_wait(timeout: float = 60.0) -> None:
    """SIGTERM to this process's parent (torchrun's agent); back once the SIGTERM it passes on to
    this process has been handled (by the handler installed before: the trainer's)."""
    handled: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)

    def note_and_pass_on(signum: int, frame: Any) -> None:
        handled.append(signum)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, note_and_pass_on)
    try:
        os.kill(os.getppid(), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not handled and time.monotonic() < deadline:
            time.sleep(0.01)  # Python runs signal handlers in this thread, between such waits
    finally:
        signal.signal(signal.SIGTERM, previous)


class DiskFullError(RunFailure):
    """The disk filled up during a write; the partial files are already removed. Its last complete
    checkpoint is intact, so freeing space and `--resume` continues the run."""


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if path.is_dir() else 0


DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space left; the user's quota used up
PROBE_BYTES = 4096  # one block of most file systems


def _is_disk_full(error: BaseException, directory: Path) -> bool:
    """Whether `error`, raised while writing into `directory`, means the disk (or quota) is full.

    Python's own writes say so plainly: an OSError with errno ENOSPC. Libraries that write from
    C++ or Rust lose the errno on the way: torch.save raises a RuntimeError ("PytorchStreamWriter
    failed writing file data/0: file write failed", or in newer versions "unexpected pos 704 vs
    598"), safetensors a SafetensorError. For those the file system itself is asked, by writing
    one more block beside the partial files (still in place, so the disk is as full as when the
    write failed): a full disk refuses it with ENOSPC.
    """
    if isinstance(error, OSError):
        return error.errno in DISK_FULL_ERRNOS
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: nothing to do with the disk
        return False
    probe = directory / f"{TEMPORARY_PREFIX}space-probe-{os.getpid()}"
    try:
        descriptor = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    except OSError as probe_error:
        return probe_error.errno in DISK_FULL_ERRNOS
    try:
        os.write(descriptor, b"\0" * PROBE_BYTES)
        os.fsync(descriptor)  # file systems that allocate late (ext4, XFS) find out here
    except OSError as probe_error:
        return probe_error.errno in DISK_FULL_ERRNOS
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)
    return False


NOT_WRITABLE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)  # no permission; a read-only file system


@contextlib.contextmanager
def writes_to(target: Path) -> Iterator[None]:
    """A write refused by the file system (no permission, a read-only mount) inside the block, as one
    sentence naming what was to be written, not the temporary name the refusal came from."""
    try:
        yield
    except OSError as error:
        if error.errno not in NOT_WRITABLE_ERRNOS:
            raise
        raise UserInputError(f"Cannot write {target}: {error.strerror.lower()}; choose a location you can write to.") from None


def _disk_full(target: Path, partial: Path) -> DiskFullError:
    """Remove the partial write `partial` and describe the failure in one sentence."""
    freed = _size_of(partial)
    if partial.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.unlink(missing_ok=True)
    return DiskFullError(
        f"No space left on device while saving {target}; freed {freed / 1e6:.1f} MB of partial files; "
        "free space and --resume."
    )


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


def _umask() -> int:
    """The process's umask (os.umask reads it only by setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old content or the new, never a mix.
    The file gets the permissions any new file gets (the umask's), not the temporary file's 0600."""
    path = Path(path)
    with writes_to(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=path.parent)
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if _is_disk_full(error, path.parent):
            raise _disk_full(path, Path(temporary)) from None
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_directory_atomically(path: str | Path, fill: Callable[[Path], None], manifest: bool = False) -> Path:
    """Create directory `path` by letting `fill` write into a temporary sibling, then renaming it.

    If `path` already exists it is replaced in two renames: the old version to a retired name
    (`retired_name`), the new one into place. Between them no folder has the name; a kill there
    leaves the old version under its retired name and the new one under its temporary name, and
    `restore_retired` (called by the next write of `path`, and by `remove_temporary_files` at a
    run's next start) puts the old one back. So at every instant one complete version exists.
    With `manifest`, a manifest.json of the files' sizes and SHA-256 sums is written last, so
    that `verify_manifest` can later tell a complete directory from a damaged one.
    """
    path = Path(path)
    with writes_to(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        restore_retired(path)
        temporary = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{path.name}-", dir=path.parent))
    try:
        temporary.chmod(0o777 & ~_umask())  # as any new folder, not mkdtemp's 0700: others may need to read an export
        fill(temporary)
        if manifest:
            write_manifest(temporary)
        for file in _files_under(temporary):
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(temporary)
        fault_point("before_rename")
        if path.exists():
            retired = retired_name(path, os.getpid())
            os.replace(path, retired)
            fault_point("between_renames")
            os.replace(temporary, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, path)
    except BaseException as error:
        if _is_disk_full(error, temporary if temporary.is_dir() else path.parent):
            raise _disk_full(path, temporary) from None
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync_directory(path.parent)
    return path


def retired_name(path: Path, pid: int) -> Path:
    """Where process `pid` puts the old version of folder `path` while it renames a new one into place."""
    return path.parent / f"{TEMPORARY_PREFIX}old-{path.name}-{pid}"


def restore_retired(path: Path) -> None:
    """Put back the old version of folder `path` if a replacement was killed between its two renames
    (the name is free, and a retired version of it waits under `retired_name`, its process gone)."""
    if path.exists():
        return
    prefix = retired_name(path, 0).name[:-1]  # the name without the pid
    for retired in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = retired.name[len(prefix):]
        if retired.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):  # its writer was killed, not still at work
            log.warning("Restoring %s: its replacement was interrupted after the old version was set aside.", path)
            os.replace(retired, path)
            return


def remove_temporary_files(run_dir: str | Path) -> None:
    """Clear what an interrupted write left behind (it never has a final name, so nothing reads it),
    after putting back any folder whose replacement was interrupted between its two renames."""
    prefix = f"{TEMPORARY_PREFIX}old-"
    for retired in Path(run_dir).glob(f"{prefix}*"):
        name = retired.name[len(prefix):].rpartition("-")[0]
        if name:
            restore_retired(retired.parent / name)
    for leftover in Path(run_dir).glob(f"{TEMPORARY_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# manifests: is this directory still exactly what was written?


def _files_under(directory: Path) -> Iterator[Path]:
    return (file for file in sorted(directory.rglob("*")) if file.is_file())


def file_sha256(path: str | Path) -> str:
    """The SHA-256 checksum of a file, read in 1 MB chunks (a model file need not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record each file's size and SHA-256 sum in `directory/manifest.json`.

    It is written after every other file, inside the temporary directory, so a manifest that
    exists always describes a finished directory.
    """
    entries = {
        file.relative_to(directory).as_posix(): {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
        for file in _files_under(directory)
        if file.name != MANIFEST_NAME
    }
    (directory / MANIFEST_NAME).write_text(json.dumps({"files": entries}, indent=2, sort_keys=True) + "\n")


def verify_manifest(directory: str | Path) -> bool:
    """Check every file listed in `directory/manifest.json`; raise a one-sentence `UserInputError`
    naming the first missing, truncated or altered file.

    Returns False, checking nothing, for a directory without a manifest: one written before
    manifests existed, which loads as it always did. The size is compared first (cheap, and it
    catches the usual damage, a truncated copy); then the sum, which catches a flipped bit.
    """
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise UserInputError(f"{manifest} is damaged (not a readable list of files and sums).") from None
    for name, (size, checksum) in expected.items():
        file = directory / name
        if not file.is_file():
            raise UserInputError(f"{file} is missing (listed in {MANIFEST_NAME}); the directory is incomplete.")
        if file.stat().st_size != size:
            raise UserInputError(f"{file} is damaged: {file.stat().st_size} bytes instead of {size} (truncated?).")
        if file_sha256(file) != checksum:
            raise UserInputError(f"{file} is damaged: its SHA-256 sum differs from the one in {MANIFEST_NAME}.")
    return True


# ------------------------------------------------------------------------------------------------
# names and locks: one trainer per run directory, inside the output directory


def check_plain_name(name: str, what: str) -> None:
    """Refuse a name that is not one plain directory name: `../../etc`, `/tmp/x` or `a/b` would put
    files outside the directory the user chose (or overwrite someone else's)."""
    if name and (name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute() or "\0" in name):
        raise UserInputError(f"{what} '{name}' must be a plain directory name, without '/', '\\' or '..'.")


def lock_run_directory(run_dir: str | Path) -> None:
    """Take `run_dir`'s lock file, holding this process's pid, or refuse in one sentence.

    Two trainers writing the same checkpoints and metrics would corrupt each other's state, so
    the second is refused. The pid is written into a claim file of this process's own first and
    the claim is then hard-linked to the lock's name: the link fails where the name exists (the
    operating system makes that atomic: of two processes linking at once, exactly one succeeds),
    and a lock is never seen without its owner. (Created empty and written after, a lock caught
    between the two looked like a dead trainer's and was taken over.) A lock left by a process
    that no longer exists (it was killed) is stale and taken over with a notice; taking over is
    one step too (`_clear_stale_lock`). The lock is released by `unlock_run_directory`, and at
    the latest when this process exits normally.
    """
    path = Path(run_dir) / LOCK_NAME
    claim = path.with_name(f".{LOCK_NAME}.claim-{os.getpid()}")
    with open(claim, "w") as file:
        file.write(f"{os.getpid()}\n")
    try:
        for _ in range(2):  # a second try after removing a stale lock
            try:
                os.link(claim, path)
            except FileExistsError:
                _clear_stale_lock(path)
                continue
            atexit.register(unlock_run_directory, run_dir)
            return
    finally:
        claim.unlink(missing_ok=True)
    raise UserInputError(f"Could not take the lock {path}: another trainer is starting in the same run directory.")


def _lock_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None  # absent, empty or garbled (damaged, or left by a version that filled it after creating it)


@contextlib.contextmanager
def _takeovers_excluded(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on `directory` itself: one process at a time takes over its lock.
    The operating system releases it when the process ends, however it ends, so it is never stale."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the flock


def _clear_stale_lock(path: Path) -> None:
    """Remove a lock whose owner is gone (or is this very process); refuse if its owner lives.

    Two trainers may find the same stale lock. Checked and removed in two steps, the second to act
    would remove the lock the first had just taken (both then train in one directory), so the check
    and the removal are one step: under `_takeovers_excluded`, and the second to get there finds the
    first one's lock, alive. (Nothing else removes a lock whose owner is gone, and a new lock can
    only be linked where there is none, so the lock checked is the lock removed.)
    """
    with _takeovers_excluded(path.parent):
        if not path.exists():  # taken over and released while this process waited: nothing to take over
            return
        owner = _lock_owner(path)
        if owner is not None and owner != os.getpid() and psutil.pid_exists(owner):
            raise UserInputError(
                f"Run directory {path.parent} is in use by another trainer (pid {owner}); wait for it to finish, "
                f"choose another --run-name, or delete {path} if no such trainer is running."
            )
        if owner != os.getpid():  # this process taking it again (a notebook preparing the run twice) is no news
            log.warning("Taking over the lock %s left by process %s, which is no longer running.", path, owner)
        path.unlink(missing_ok=True)


def unlock_run_directory(run_dir: str | Path) -> None:
    """Remove `run_dir`'s lock if this process owns it (safe to call more than once)."""
    path = Path(run_dir) / LOCK_NAME
    if _lock_owner(path) == os.getpid():
        path.unlink(missing_ok=True)
