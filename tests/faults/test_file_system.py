"""File-system drills: a kill between the two renames that replace a folder, a torn status.json, and
a read-only output directory."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import run_in_process
from helpers import assert_one_sentence, tiny_arguments
from minigpt.files import FAULT_POINT_VARIABLE, TEMPORARY_PREFIX, remove_temporary_files, write_directory_atomically

REPLACE_KILLED_BETWEEN_RENAMES = """
import sys
from pathlib import Path
from minigpt.files import write_directory_atomically
write_directory_atomically(Path(sys.argv[1]), lambda folder: (folder / "version.txt").write_text("new"))
"""


def version_folder(path: Path, version: str) -> Path:
    return write_directory_atomically(path, lambda folder: (folder / "version.txt").write_text(version))


@pytest.fixture
def killed_between_renames(tmp_path) -> Path:
    """`tmp_path/model` at version "old", then a replacement killed (SIGKILL) after the old version
    was renamed away and before the new one was renamed into place: no folder has the name."""
    target = version_folder(tmp_path / "model", "old")
    killed = subprocess.run([sys.executable, "-c", REPLACE_KILLED_BETWEEN_RENAMES, str(target)],
                            env={**os.environ, FAULT_POINT_VARIABLE: "between_renames"}, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not target.exists() and len(list(tmp_path.glob(f"{TEMPORARY_PREFIX}*"))) == 2  # the old version and the new
    return target


def test_a_kill_between_the_renames_then_the_next_start_restores_the_previous_version(killed_between_renames):
    """A run's next start clears the temporary names: both versions were under one, and were deleted."""
    remove_temporary_files(killed_between_renames.parent)
    assert (killed_between_renames / "version.txt").read_text() == "old"
    assert [path.name for path in killed_between_renames.parent.iterdir()] == ["model"]


def test_a_kill_between_the_renames_then_the_next_write_replaces_the_restored_version(killed_between_renames):
    """An export's folder is outside any run: its next write restores the old version and replaces it
    as usual, leaving no hidden copy behind."""
    version_folder(killed_between_renames, "newer")
    assert (killed_between_renames / "version.txt").read_text() == "newer"
    assert not list(killed_between_renames.parent.glob(f"{TEMPORARY_PREFIX}old-*"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_jsonl, tokenizer_file) -> Path:
    directory = tmp_path_factory.mktemp("torn")
    assert run_in_process("train", *tiny_arguments(corpus_jsonl, tokenizer_file, "torn", "--max-steps", "2"), cwd=directory).returncode == 0
    return directory / "runs" / "torn"


@pytest.mark.parametrize("damage", ["cut in half", "cut inside a character", "not an object"])
def test_a_torn_status_file_is_read_as_unknown_or_refused_in_one_sentence(finished_run, damage, monkeypatch):
    """status.json is replaced atomically, but a copy cut short or a disk error can still tear it. The
    monitor took a torn one for a run still starting and watched the finished run forever."""
    import minigpt.cli.monitor

    def watching_forever(seconds):
        raise AssertionError("the monitor watches a finished run as if it were live")

    monkeypatch.setattr(minigpt.cli.monitor.time, "sleep", watching_forever)
    status = finished_run / "status.json"
    whole = status.read_bytes()
    try:
        status.write_bytes({"cut in half": whole[: len(whole) // 2], "cut inside a character": b'{"message": "\xe2\x80',
                            "not an object": b"[1, 2]"}[damage])
        monitored = run_in_process("monitor", str(finished_run), cwd=finished_run)
        assert monitored.returncode == 0 and "Traceback" not in monitored.stderr, monitored.stderr
        assert "[unknown]" in monitored.stdout and "status.json is damaged" in monitored.stdout
        reported = run_in_process("report", str(finished_run), cwd=finished_run)
        assert reported.returncode in (0, 2), reported.stderr
        if reported.returncode == 2:
            assert_one_sentence(reported.stderr, "status.json")
    finally:
        status.write_bytes(whole)


@pytest.fixture
def read_only_directory():
    """A directory this process cannot write into. Permissions do not stop root, so as root it is a
    read-only mount (a tmpfs mounted `ro`); elsewhere a folder without write permission."""
    directory = Path(tempfile.mkdtemp(prefix="minigpt-read-only-"))
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)], capture_output=True)
        if mounted.returncode:
            directory.rmdir()
            pytest.skip("as root only a read-only mount keeps a directory from being written, and mounting is not allowed here")
        yield directory
        subprocess.run(["umount", "--lazy", str(directory)], check=True)
    else:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("command", ["train", "export", "evaluate"])
def test_a_read_only_output_directory_is_refused_in_one_sentence(tmp_path, read_only_directory, command, corpus_jsonl,
                                                                 tokenizer_file, finished_run):
    model_folder = finished_run / "final_model"
    arguments = {
        "train": [*tiny_arguments(corpus_jsonl, tokenizer_file, "run", "--max-steps", "2"), "--output-dir", str(read_only_directory)],
        "export": [str(model_folder), "--format", "hf", "--output", str(read_only_directory / "export")],
        "evaluate": [str(model_folder), "--data-files", str(corpus_jsonl), "--max-batches", "1",
                     "--output", str(read_only_directory / "results.json")],
    }[command]
    result = run_in_process(command, *arguments, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert_one_sentence(result.stderr.strip().splitlines()[-1], "error: ", str(read_only_directory))
    assert not list(read_only_directory.iterdir()) and not list(tmp_path.iterdir())
