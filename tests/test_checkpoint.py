"""Checkpoints: atomic, complete, pruned sensibly, and loadable without unpickling code."""

import argparse

import pytest
import torch

from minigpt import checkpoint as checkpoint_module
from minigpt.checkpoint import (
    latest_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint,
)
from minigpt.config import ModelConfig
from minigpt.errors import UserInputError
from minigpt.files import atomic_write_bytes
from minigpt.model import GPT


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))


def test_round_trip_restores_weights_and_state(tmp_path):
    model = small_model(0)
    state = {"progress": {"step": 3}, "tensor": torch.arange(5), "rng": torch.get_rng_state()}
    path = save_checkpoint(tmp_path, 3, model, state, {"val_loss": 1.5})
    assert path.name == "checkpoint_step_3"
    other = small_model(1)
    loaded_state, meta = load_checkpoint(path, other)
    for (name, expected), actual in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(expected, actual), name
    assert other.lm_head.weight is other.token_embedding.weight  # still tied after loading
    assert loaded_state["progress"] == {"step": 3} and torch.equal(loaded_state["tensor"], torch.arange(5))
    assert meta == {"step": 3, "val_loss": 1.5}


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = small_model()
    save_checkpoint(tmp_path, 10, model, {"step": 10}, {})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 20, model, {"step": 20}, {})
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint_step_10"]
    assert [entry.name for entry in tmp_path.iterdir()] == ["checkpoint_step_10"]  # no half-written leftovers
    state, _ = load_checkpoint(latest_checkpoint(tmp_path), small_model())
    assert state == {"step": 10}


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    model = small_model()
    for step, val_loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, None)]:
        save_checkpoint(tmp_path, step, model, {}, {"val_loss": val_loss})
    prune_checkpoints(tmp_path, keep=2)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint_step_2", "checkpoint_step_4", "checkpoint_step_5"]


def test_an_incomplete_or_foreign_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint_step_1").mkdir()
    with pytest.raises(UserInputError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoint_step_1", small_model())
    path = save_checkpoint(tmp_path, 2, small_model(), {}, {})
    wider = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=64))
    with pytest.raises(UserInputError, match="do not fit"):
        load_checkpoint(path, wider)


def test_state_files_are_loaded_without_unpickling_objects(tmp_path):
    path = save_checkpoint(tmp_path, 1, small_model(), {"ok": 1}, {})
    (path / "manifest.json").unlink()  # as if written before manifests existed (or forged along with the file)
    torch.save({"evil": argparse.Namespace(x=1)}, path / "state.pt")  # an arbitrary object: refused
    with pytest.raises(UserInputError, match="other than tensors and plain values"):
        load_checkpoint(path, small_model())


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "status.json"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert [entry.name for entry in tmp_path.iterdir()] == ["status.json"]


def test_a_run_whose_only_checkpoint_is_damaged_names_one_way_out_both_ways(tmp_path):
    """--resume cannot continue a damaged checkpoint, and starting the run again without --resume
    is refused because the directory holds a run: both sentences name the same way out, a new
    --run-name, which leaves the damaged run where it is."""
    from minigpt.config import apply_overrides, preset_config
    from minigpt.files import write_manifest
    from minigpt.run import resolve_run_paths

    checkpoint = tmp_path / "runs" / "broken" / "checkpoint_step_10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    write_manifest(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"weigh")  # truncated
    (tmp_path / "runs" / "broken" / "config.json").write_text("{}")
    messages = []
    for resume in ("latest", ""):
        config = apply_overrides(preset_config("tiny"), {"train.output_dir": str(tmp_path / "runs"), "train.run_name": "broken",
                                                         "train.resume": resume})
        with pytest.raises(UserInputError) as refused:
            resolve_run_paths(config)
        messages.append(str(refused.value))
    for message in messages:
        assert "damaged" in message and "under another --run-name" in message and "with --resume" not in message, message
    assert checkpoint.is_dir()  # nothing is deleted


def test_saved_files_and_folders_follow_the_umask(tmp_path):
    """Files and folders written atomically get the permissions of any other file the user makes
    (0644 and 0755 under the usual umask 022), not the temporary files' 0600 and 0700: a service
    user (Ollama's, a web server's) must be able to read an export."""
    import os
    import stat

    from minigpt.files import write_directory_atomically

    previous = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        folder = write_directory_atomically(tmp_path / "folder", lambda directory: atomic_write_bytes(directory / "b.bin", b"x"))
        os.umask(0o077)  # a private umask is kept private
        atomic_write_bytes(tmp_path / "private.json", b"{}")
    finally:
        os.umask(previous)
    assert [stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "a.json", folder, folder / "b.bin", tmp_path / "private.json")] \
        == [0o644, 0o755, 0o644, 0o600]
