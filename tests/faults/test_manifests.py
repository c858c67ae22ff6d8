"""Checksummed checkpoints: a damaged file is named in one sentence, and --resume falls back past it."""

import json
import logging

import pytest

from helpers import assert_one_sentence, small_model
from minigpt.checkpoint import (
    latest_intact_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint,
)
from minigpt.config import load_config
from minigpt.errors import UserInputError
from minigpt.files import verify_manifest
from minigpt.model import GPT
from minigpt.model_folder import load, save_model_directory
from minigpt.tokenizer import load_tokenizer


def truncate(path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def flip_one_bit(path, position: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01  # same size, different content: only the SHA-256 sum notices
    path.write_bytes(bytes(data))


def test_a_manifest_lists_every_file_with_its_size_and_sum(tmp_path):
    path = save_checkpoint(tmp_path, 1, small_model(), {"step": 1}, {})
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(files) == ["meta.json", "model.safetensors", "state.pt"]
    assert files["state.pt"]["bytes"] == (path / "state.pt").stat().st_size and len(files["state.pt"]["sha256"]) == 64
    assert verify_manifest(path)


@pytest.mark.parametrize("damage", [truncate, flip_one_bit])
@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "meta.json"])
def test_a_damaged_checkpoint_is_named_in_one_sentence_and_resume_falls_back(tmp_path, caplog, damage, name):
    save_checkpoint(tmp_path, 1, small_model(), {"step": 1}, {"val_loss": 2.0})
    newest = save_checkpoint(tmp_path, 2, small_model(), {"step": 2}, {"val_loss": 1.0})
    damage(newest / name, **({"keep": 10} if damage is truncate else {}))
    with pytest.raises(UserInputError) as error:
        load_checkpoint(newest, small_model())
    assert_one_sentence(str(error.value), f"checkpoint_step_2/{name}", "damaged")
    with caplog.at_level(logging.WARNING, logger="minigpt.checkpoint"):
        assert latest_intact_checkpoint(tmp_path) == tmp_path / "checkpoint_step_1"
    [line] = [record.getMessage() for record in caplog.records]
    assert "checkpoint_step_2" in line and "Falling back" in line and "\n" not in line
    prune_checkpoints(tmp_path, keep=1)  # a damaged meta.json does not break pruning either


def test_a_checkpoint_written_before_manifests_existed_still_loads(tmp_path):
    path = save_checkpoint(tmp_path, 3, small_model(), {"step": 3}, {})
    (path / "manifest.json").unlink()
    assert not verify_manifest(path)
    state, meta = load_checkpoint(path, small_model())
    assert state == {"step": 3} and meta["step"] == 3
    assert latest_intact_checkpoint(tmp_path) == path


def test_a_garbled_manifest_is_one_sentence(tmp_path):
    path = save_checkpoint(tmp_path, 1, small_model(), {}, {})
    (path / "manifest.json").write_text('{"files": [1, 2')
    with pytest.raises(UserInputError) as error:
        load_checkpoint(path, small_model())
    assert_one_sentence(str(error.value), "manifest.json is damaged")


def test_final_model_is_verified_when_loaded(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    config = load_config("tiny")
    config.model.vocab_size = tokenizer.vocab_size
    directory = save_model_directory(tmp_path / "final_model", GPT(config.model), config, tokenizer)
    assert sorted(json.loads((directory / "manifest.json").read_text())["files"]) == ["config.json", "model.safetensors", "tokenizer.json"]
    load(directory)  # intact: loads
    flip_one_bit(directory / "model.safetensors")
    with pytest.raises(UserInputError) as error:
        load(directory)
    assert_one_sentence(str(error.value), "final_model/model.safetensors is damaged", "SHA-256")
