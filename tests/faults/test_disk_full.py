"""A full disk while saving: the previous checkpoint stays, the partial write goes, and the run stops
with one sentence and exit status 1.

Simulated the two ways a full disk shows itself: Python's own writes raise OSError(ENOSPC), while
torch.save raises a RuntimeError that has lost the errno. Where the tests run as root, a real
1 MB file system is filled too.
"""

import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import assert_one_sentence, small_model, tiny_arguments
from minigpt import checkpoint as checkpoint_module
from minigpt import model_folder
from minigpt.model_folder import save_model_directory
from minigpt.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from minigpt.cli.train import main as train_main
from minigpt.config import load_config
from minigpt.files import DiskFullError, LOCK_NAME, TEMPORARY_PREFIX, atomic_write_bytes, verify_manifest
from minigpt.tokenizer import load_tokenizer

PARTIAL_BYTES = 3_000_000  # what the "disk" accepted before it filled up


def fill_the_disk(_what, path, *args, **kwargs):
    """A stand-in for torch.save or safetensors' save_model: writes part of its file, then finds the disk full."""
    with open(path, "wb") as file:
        file.write(b"\0" * PARTIAL_BYTES)
    raise OSError(errno.ENOSPC, "No space left on device")


def disk_full_at_fsync(descriptor: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


TORCH_WRITE_FAILURE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # torch 2.13 on a full disk


def torch_save_fills_the_disk(monkeypatch):
    """A stand-in for torch.save on a disk that fills up: the part that fits is written, then torch
    raises its RuntimeError, which carries no errno; from then on every write finds the disk full."""

    def no_space(descriptor, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(_what, path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(b"\0" * PARTIAL_BYTES)
        monkeypatch.setattr(os, "write", no_space)
        raise RuntimeError(TORCH_WRITE_FAILURE)

    return save


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 10, small_model(), {"step": 10}, {})
    monkeypatch.setattr(checkpoint_module.torch, "save", fill_the_disk)
    with pytest.raises(DiskFullError) as error:
        save_checkpoint(tmp_path, 20, small_model(), {"step": 20}, {})
    assert_one_sentence(str(error.value), "No space left on device while saving", "checkpoint_step_20",
                        "freed 3.", "MB of partial files", "free space and --resume")
    assert error.value.exit_status == 1
    assert [entry.name for entry in tmp_path.iterdir()] == ["checkpoint_step_10"]  # the partial directory is gone
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint_step_10", small_model())[0] == {"step": 10}


def test_torch_saves_runtime_error_on_a_full_disk_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 10, small_model(), {"step": 10}, {})
    monkeypatch.setattr(checkpoint_module.torch, "save", torch_save_fills_the_disk(monkeypatch))
    with pytest.raises(DiskFullError) as error:
        save_checkpoint(tmp_path, 20, small_model(), {"step": 20}, {})
    assert_one_sentence(str(error.value), "No space left on device while saving", "checkpoint_step_20", "freed 3.", "--resume")
    assert [entry.name for entry in tmp_path.iterdir()] == ["checkpoint_step_10"]  # the partial directory and the probe are gone
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint_step_10", small_model())[0] == {"step": 10}


def test_a_runtime_error_with_room_on_the_disk_is_not_called_a_full_disk(tmp_path, monkeypatch):
    def save(_what, path, *args, **kwargs):
        raise RuntimeError(TORCH_WRITE_FAILURE)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(tmp_path, 20, small_model(), {"step": 20}, {})
    assert list(tmp_path.iterdir()) == []  # the partial directory is removed all the same


@pytest.fixture
def one_megabyte_disk():
    """A real file system of 1 MB (tmpfs); mounting one needs root, so elsewhere the test is skipped.
    Mounted outside pytest's own temporary directories, which pytest may move away while the test runs."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    disk = Path(tempfile.mkdtemp(prefix="minigpt-full-disk-"))
    try:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
            pytest.skip("this machine does not allow mounting a tmpfs")
        yield disk
        # Lazily: the test's loaded checkpoint may still be mapped in memory until it is collected.
        subprocess.run(["umount", "--lazy", str(disk)], check=True)
    finally:
        disk.rmdir()


def test_a_really_full_disk_during_a_checkpoint(one_megabyte_disk):
    save_checkpoint(one_megabyte_disk, 10, small_model(), {"step": 10}, {})
    too_big = {"step": 20, "optimizer": torch.zeros(1_000_000)}  # 4 MB of state on a 1 MB disk: torch.save fails
    with pytest.raises(DiskFullError) as error:
        save_checkpoint(one_megabyte_disk, 20, small_model(), too_big, {})
    assert_one_sentence(str(error.value), "No space left on device while saving", "checkpoint_step_20", "MB of partial files")
    assert [entry.name for entry in one_megabyte_disk.iterdir()] == ["checkpoint_step_10"]
    assert load_checkpoint(one_megabyte_disk / "checkpoint_step_10", small_model())[0] == {"step": 10}


def test_a_full_disk_while_writing_final_model_keeps_the_old_one(tmp_path, monkeypatch, tokenizer_file):
    tokenizer, config = load_tokenizer(tokenizer_file), load_config("tiny")
    save_model_directory(tmp_path / "final_model", small_model(), config, tokenizer)
    monkeypatch.setattr(model_folder, "save_model", fill_the_disk)
    with pytest.raises(DiskFullError, match="final_model"):
        save_model_directory(tmp_path / "final_model", small_model(1), config, tokenizer)
    assert [entry.name for entry in tmp_path.iterdir()] == ["final_model"]
    assert verify_manifest(tmp_path / "final_model")


def test_a_full_disk_during_a_small_file_write_removes_the_temporary_file(tmp_path, monkeypatch):
    atomic_write_bytes(tmp_path / "status.json", b"old")
    monkeypatch.setattr("os.fsync", disk_full_at_fsync)
    with pytest.raises(DiskFullError, match="status.json"):
        atomic_write_bytes(tmp_path / "status.json", b"new")
    assert [entry.name for entry in tmp_path.iterdir()] == ["status.json"]
    assert (tmp_path / "status.json").read_bytes() == b"old"


@pytest.mark.parametrize("failure", ["OSError", "torch RuntimeError"])
def test_training_stops_with_one_sentence_and_status_1(tmp_path, monkeypatch, capsys, corpus_jsonl, tokenizer_file, failure):
    real_save = checkpoint_module.torch.save
    fills_the_disk = fill_the_disk if failure == "OSError" else torch_save_fills_the_disk(monkeypatch)
    saves = []

    def second_save_fills_the_disk(what, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            return fills_the_disk(what, path)
        return real_save(what, path, *args, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint_module.torch, "save", second_save_fills_the_disk)
    status = train_main(tiny_arguments(corpus_jsonl, tokenizer_file, "full", "--max-steps", "4", "--save-steps", "2"))
    error = capsys.readouterr().err
    assert status == 1, error
    assert_one_sentence(error, "error: No space left on device while saving", "checkpoint_step_4", "--resume")
    run = tmp_path / "runs" / "full"
    assert [path.name for path in list_checkpoints(run)] == ["checkpoint_step_2"] and verify_manifest(run / "checkpoint_step_2")
    assert not list(run.glob(f"{TEMPORARY_PREFIX}*")) and not (run / LOCK_NAME).exists()  # the lock is released on errors too
