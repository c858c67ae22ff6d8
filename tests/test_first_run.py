"""What a new user meets in minute one: a small file, a file saved by a Windows editor."""

import json
import logging

import pytest

from conftest import run_script
from minigpt.config import apply_overrides, preset_config
from minigpt.errors import UserInputError
from minigpt.metrics import read_metrics
from minigpt.run import prepare_run
from minigpt.sources import DocumentReader, iter_documents


def notes(path, count, words=6):
    """`count` short documents, as a user's first notes.jsonl would be."""
    with open(path, "w", encoding="utf-8") as file:
        for number in range(count):
            file.write(json.dumps({"text": f"Note {number}: " + " ".join(f"word{(number * 7 + k) % 50}" for k in range(words))}) + "\n")
    return path


def tiny_run(tmp_path, tokenizer_file, data, name, **overrides):
    config = apply_overrides(preset_config("tiny"), {
        "train.data_files": [str(data)], "train.tokenizer_path": str(tokenizer_file), "train.output_dir": str(tmp_path / "runs"),
        "train.run_name": name, "train.sample_tokens": 0, "train.max_steps": 10, "train.eval_steps": 5,
        "train.disable_monitoring": True, "train.dtype": "float32", **overrides,
    })
    return prepare_run(config, show_progress=False)


def test_a_small_file_trains_with_a_larger_hold_out_said_in_one_line(tmp_path, tokenizer_file, caplog):
    caplog.set_level(logging.INFO, logger="minigpt")
    trainer = tiny_run(tmp_path, tokenizer_file, notes(tmp_path / "notes.jsonl", 60), "small")
    held_out = trainer.config.train.val_fraction
    assert 0.01 < held_out < 0.5
    assert "holding out" in caplog.text and "of the documents for validation instead" in caplog.text
    assert json.loads((trainer.run_dir / "config.json").read_text())["train"]["val_fraction"] == held_out  # resume reads the same split
    trainer.train()
    assert [row["step"] for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row["type"] == "eval"] == [5, 10]


def test_data_too_small_for_both_trains_without_validation(tmp_path, tokenizer_file, caplog):
    caplog.set_level(logging.INFO, logger="minigpt")
    trainer = tiny_run(tmp_path, tokenizer_file, notes(tmp_path / "few.jsonl", 4), "few", **{"train.early_stopping_patience": 2})
    assert trainer.config.train.val_fraction == 0 and trainer.val_batches is None
    assert "training without validation" in caplog.text and "early stopping is off" in caplog.text
    summary = trainer.train()
    assert summary["stop_reason"] == "max_steps" and summary["best_val_loss"] is None
    assert not [row for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row["type"] == "eval"]
    assert (trainer.run_dir / "final_model" / "model.safetensors").is_file()


def test_only_data_that_cannot_fill_one_training_block_is_an_error(tmp_path, tokenizer_file):
    with pytest.raises(UserInputError, match="does not fill one block"):
        tiny_run(tmp_path, tokenizer_file, notes(tmp_path / "one.jsonl", 1, words=3), "one")


def test_the_small_file_of_the_issue_trains_from_the_command_line(tmp_path, tokenizer_file):
    notes(tmp_path / "notes.jsonl", 60)
    result = run_script("train.py", "--config", "tiny", "--data-files", "notes.jsonl", "--tokenizer", str(tokenizer_file),
                        "--max-steps", "5", "--sample-tokens", "0", "--dtype", "float32", "--output-dir", "runs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "of the documents for validation instead" in result.stdout + result.stderr


def test_a_byte_order_mark_and_windows_line_ends_are_not_content(tmp_path):
    records = [{"text": "first line"}, {"text": "second line"}]
    plain = "".join(json.dumps(record) + "\n" for record in records)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + plain.replace("\n", "\r\n").encode("utf-8"))
    reader = DocumentReader([tmp_path / "bom.jsonl"], "text")
    assert [reader.next_document().text for _ in records] == ["first line", "second line"]
    assert reader.report.bad_lines == 0
    text = "A paragraph\nof two lines.\n\nAnother one.\n"
    (tmp_path / "unix.txt").write_text(text, encoding="utf-8", newline="\n")
    (tmp_path / "windows.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    assert list(iter_documents([tmp_path / "windows.txt"])) == list(iter_documents([tmp_path / "unix.txt"]))
