"""A full disk (ENOSPC, simulated) while saving: the previous checkpoint stays, the partial write goes,
and the run stops with one sentence and exit status 1."""

import errno

import pytest

from helpers import assert_one_sentence, small_model, tiny_arguments
from minigpt import checkpoint as checkpoint_module
from minigpt.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, save_model_directory
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


def test_a_full_disk_while_writing_final_model_keeps_the_old_one(tmp_path, monkeypatch, tokenizer_file):
    tokenizer, config = load_tokenizer(tokenizer_file), load_config("tiny")
    save_model_directory(tmp_path / "final_model", small_model(), config, tokenizer)
    monkeypatch.setattr(checkpoint_module, "save_model", fill_the_disk)
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


def test_training_stops_with_one_sentence_and_status_1(tmp_path, monkeypatch, capsys, corpus_jsonl, tokenizer_file):
    real_save = checkpoint_module.torch.save
    saves = []

    def second_save_fills_the_disk(what, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            return fill_the_disk(what, path)
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
