"""Hostile names and files: escaping run names, code hidden in a pickle, a bad config.json."""

import json

import pytest
import torch

from helpers import assert_one_sentence, small_model, tiny_arguments
from minigpt.checkpoint import load_checkpoint, save_checkpoint
from minigpt.cli.train import main as train_main
from minigpt.config import load_config
from minigpt.errors import UserInputError
from minigpt.files import write_manifest

MARKER_NAME = "code-ran"


def leave_a_marker(path: str) -> None:
    """What the hostile pickle would call while being read."""
    with open(path, "w") as file:
        file.write("unpickling ran code")


class RunsCodeWhenUnpickled:
    """An object whose pickle says "call leave_a_marker(path)" to rebuild it: any function would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return leave_a_marker, (self.path,)


@pytest.mark.parametrize("name", ["../../etc", "..", "/tmp/elsewhere", "runs/nested"])
def test_a_run_name_that_leaves_the_output_directory_is_refused(tmp_path, monkeypatch, capsys, name, corpus_jsonl,
                                                                 tokenizer_file):
    monkeypatch.chdir(tmp_path)
    status = train_main(tiny_arguments(corpus_jsonl, tokenizer_file, name, "--max-steps", "1"))
    assert status == 2
    assert_one_sentence(capsys.readouterr().err, f"--run-name '{name}' must be a plain directory name")
    assert not (tmp_path / "runs").exists()


def test_a_state_file_carrying_code_is_refused_unread(tmp_path):
    path = save_checkpoint(tmp_path, 1, small_model(), {"step": 1}, {})
    marker = tmp_path / MARKER_NAME
    torch.save({"optimizer": RunsCodeWhenUnpickled(str(marker))}, path / "state.pt")
    (path / "manifest.json").unlink()
    write_manifest(path)  # forged along with it: the manifest guards against damage, not against an attacker
    with pytest.raises(UserInputError) as error:
        load_checkpoint(path, small_model())
    assert_one_sentence(str(error.value), "state.pt holds Python objects other than tensors", "can run code")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"train": {"max_steps": "many"}}, "'train.max_steps' must be int"),
        ({"model": {"n_layer": 2.5}}, "'model.n_layer' must be int"),
        ({"train": {"learning_rate": float("nan")}}, "'train.learning_rate' must be float"),
        ({"train": {"plot_loss": "perhaps"}}, "must be true or false"),
        ({"train": {"bogus": 1}}, "unknown setting 'train.bogus'"),
        ({"bogus": 1}, "unknown top-level key"),
        ({"model": 5}, "'model' must be a table"),
        ({"preset": {"tiny": 1}}, "'preset' must be a preset's name"),
        ([1, 2], "must hold a table"),
    ],
)
def test_a_bad_config_json_is_one_sentence(tmp_path, content, fragment):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserInputError) as error:
        load_config(str(path))
    assert_one_sentence(str(error.value), fragment, str(path))


def test_resuming_a_run_with_a_damaged_config_json_is_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "damaged"
    save_checkpoint(run, 1, small_model(), {}, {})
    (run / "config.json").write_text('{"model": {"n_layer": 2,')  # cut short
    status = train_main(["--resume", "--run-name", "damaged", "--output-dir", "runs"])
    assert status == 2
    assert_one_sentence(capsys.readouterr().err, "config.json could not be parsed")
