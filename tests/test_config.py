"""Configuration: presets, files, overrides, and one clear sentence for every impossible setting."""

import dataclasses
import json

import pytest

from minigpt.config import PRESETS, RunConfig, apply_overrides, load_config, preset_config, validate
from minigpt.errors import UserInputError
from minigpt.model import GPT


@pytest.mark.parametrize("name, low, high", [("tiny", 0.05, 0.5), ("small", 10, 14), ("medium", 25, 30), ("large", 95, 110)])
def test_presets_are_valid_and_sized_as_documented(name, low, high):
    config = preset_config(name)
    validate(config)
    vocab = config.train.tokenizer_vocab_size
    model = GPT(dataclasses.replace(config.model, vocab_size=vocab))
    assert low <= model.num_parameters() / 1e6 <= high


def test_toml_file_layers_over_its_preset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\n[model]\nn_layer = 3\n[train]\nlearning_rate = 0.01\ndata_files = ["a.txt"]\n')
    config = load_config(str(path))
    assert config.model.n_layer == 3 and config.model.n_embd == 64  # the rest comes from tiny
    assert config.train.learning_rate == 0.01 and config.train.data_files == ["a.txt"]


def test_json_round_trip(tmp_path):
    config = apply_overrides(preset_config("small"), {"train.seed": "7", "model.dropout": "0.1"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(str(path)) == config


def test_overrides_convert_command_line_strings():
    config = apply_overrides(RunConfig(), {"model.n_head": "8", "train.plot_loss": "true", "train.data_files": "a.jsonl,b.txt"})
    assert config.model.n_head == 8 and config.train.plot_loss is True
    assert config.train.data_files == ["a.jsonl", "b.txt"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.n_embd": 100, "model.n_head": 3}, "must divide model.n_embd"),
        ({"model.n_head": 4, "model.n_kv_head": 3}, "must divide model.n_head"),
        ({"model.block_size": 0}, "block_size must be positive"),
        ({"train.learning_rate": 1e-4, "train.min_learning_rate": 1e-3}, "above the learning rate"),
        ({"train.lr_scheduler": "exponential"}, "must be one of cosine, linear, constant"),
        ({"train.max_steps": 0, "train.max_time": 0}, "Give the run an end"),
        ({"model.dropout": 1.5}, "dropout must be in"),
        ({"train.num_epochs": 1, "train.overfit_batch": True}, "--overfit-batch trains on one batch"),
        ({"train.max_steps": 0, "train.max_time": 60, "train.warmup_ratio": 0.1}, "bounded by --max-time alone"),
    ],
)
def test_impossible_configurations_are_explained(overrides, message):
    with pytest.raises(UserInputError, match=message):
        validate(apply_overrides(preset_config("tiny"), overrides))


def test_model_vocabulary_must_hold_the_tokenizer():
    config = apply_overrides(preset_config("tiny"), {"model.vocab_size": 300})
    with pytest.raises(UserInputError, match="smaller than the tokenizer"):
        validate(config, tokenizer_vocab_size=512)


@pytest.mark.parametrize(
    "overrides, message",
    [({"model.n_layers": 3}, "unknown setting 'model.n_layers'"), ({"model.n_layer": "three"}, "must be int"),
     ({"train.plot_loss": "maybe"}, "must be true or false")],
)
def test_bad_overrides_are_explained(overrides, message):
    with pytest.raises(UserInputError, match=message):
        apply_overrides(RunConfig(), overrides)


def test_bad_config_names_and_files(tmp_path):
    with pytest.raises(UserInputError, match="neither a preset"):
        load_config("huge")
    with pytest.raises(UserInputError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(UserInputError, match="could not be parsed"):
        load_config(str(broken))
    assert set(PRESETS) == {"tiny", "small", "medium", "large"}


def test_a_later_layers_warmup_or_epochs_replace_an_earlier_layers():
    epochs = apply_overrides(preset_config("tiny"), {"train.warmup_ratio": 0.1, "train.num_epochs": 2})
    assert (epochs.train.warmup_steps, epochs.train.max_steps) == (0, 0)  # the preset's 10 and 200 give way
    steps = apply_overrides(epochs, {"train.warmup_steps": 5})
    assert (steps.train.warmup_steps, steps.train.warmup_ratio) == (5, 0.0)  # and the ratio gives way to steps given later
    capped = apply_overrides(preset_config("tiny"), {"train.num_epochs": 2, "train.max_steps": 50})
    assert capped.train.max_steps == 50  # given together, max_steps caps the epochs
