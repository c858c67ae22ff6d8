"""The loop's arithmetic and its stopping rules, checked in-process on the tiny preset."""

import json
import logging
import math

import pytest
import torch

from conftest import run_script
from minigpt.checkpoint import list_checkpoints
from minigpt.config import apply_overrides, preset_config
from minigpt.data import TokenBlockStream
from minigpt.errors import UserInputError
from minigpt.metrics import read_metrics
from minigpt.objective import LanguageModelObjective
from minigpt.optim import learning_rate_at
from minigpt.run import prepare_run
from minigpt.tokenizer import load_tokenizer
from minigpt.trainer import Callback


def tiny(tmp_path, corpus_jsonl, tokenizer_file, name, callbacks=None, **overrides):
    settings = {
        "train.data_files": [str(corpus_jsonl)], "train.tokenizer_path": str(tokenizer_file), "train.val_fraction": 0.1,
        "train.output_dir": str(tmp_path / "runs"), "train.run_name": name, "train.sample_tokens": 0, "train.eval_batches": 1,
        "train.shuffle_buffer": 0, "train.disable_monitoring": True, "train.dtype": "float32", **overrides,
    }
    return prepare_run(apply_overrides(preset_config("tiny"), settings), show_progress=False, callbacks=callbacks)


class KeepGradients(Callback):
    """The gradients of the last timed step, as the optimizer is about to apply them."""

    def on_gradients(self, trainer) -> None:
        self.gradients = {name: parameter.grad.clone() for name, parameter in trainer.model.named_parameters()}


def test_accumulating_micro_batches_equals_one_large_batch(tmp_path, corpus_jsonl, tokenizer_file):
    """The gradient itself is compared, with clipping off: AdamW's update barely changes when every
    gradient is doubled (an accumulated loss left unscaled), so equal weights alone would not show it."""
    kept = {"one": KeepGradients(), "two": KeepGradients()}
    common = {"train.max_steps": 1, "train.grad_clip": 0.0, "train.log_steps": 1}
    one = tiny(tmp_path, corpus_jsonl, tokenizer_file, "one", [kept["one"]], **{"train.batch_size": 8, **common})
    accumulated = tiny(tmp_path, corpus_jsonl, tokenizer_file, "two", [kept["two"]],
                       **{"train.batch_size": 4, "train.gradient_accumulation_steps": 2, **common})
    one.train()
    accumulated.train()
    for name, expected in kept["one"].gradients.items():
        torch.testing.assert_close(kept["two"].gradients[name], expected, rtol=1e-4, atol=1e-7, msg=name)
    for (name, expected), actual in zip(one.model.state_dict().items(), accumulated.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def assert_learning_rates_follow_the_clock(trainer) -> list[dict]:
    """Each logged step's learning rate was set between the previous row and this one, so it lies
    between the schedule's values at those two elapsed times (the decay never rises with time)."""
    rows = [row for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row["type"] == "train"]
    previous_elapsed = 0.0
    for row in rows:
        latest = learning_rate_at(row["step"] - 1, trainer.train_config, row["elapsed_seconds"])
        earliest = learning_rate_at(row["step"] - 1, trainer.train_config, previous_elapsed)
        assert latest - 1e-12 <= row["lr"] <= earliest + 1e-12, row
        previous_elapsed = row["elapsed_seconds"]
    return rows


def test_with_both_budgets_set_the_step_budget_ends_the_run_when_it_ends_first(tmp_path, corpus_jsonl, tokenizer_file):
    run = tiny(tmp_path, corpus_jsonl, tokenizer_file, "steps-first", **{
        "train.max_steps": 8, "train.max_time": 3600.0, "train.warmup_steps": 0, "train.lr_scheduler": "linear", "train.log_steps": 1})
    summary = run.train()
    assert summary["stop_reason"] == "max_steps" and summary["steps"] == 8 and summary["training_seconds"] < 3600
    rows = assert_learning_rates_follow_the_clock(run)
    train = run.train_config
    assert rows[-1]["lr"] == learning_rate_at(7, train, 0.0) == train.final_learning_rate + (train.learning_rate - train.final_learning_rate) / 8


def test_with_both_budgets_set_the_time_budget_ends_the_run_when_it_runs_out_first(tmp_path, corpus_jsonl, tokenizer_file):
    run = tiny(tmp_path, corpus_jsonl, tokenizer_file, "time-first", **{
        "train.max_steps": 100_000, "train.max_time": 2.0, "train.warmup_steps": 0, "train.lr_scheduler": "linear",
        "train.log_steps": 1})
    summary = run.train()
    assert summary["stop_reason"] == "max_time" and summary["steps"] < 100_000 and summary["training_seconds"] >= 2.0
    rows = assert_learning_rates_follow_the_clock(run)
    assert rows[-1]["elapsed_seconds"] >= 2.0
    steps_alone = learning_rate_at(rows[-1]["step"] - 1, run.train_config, 0.0)  # what 100,000 steps would still allow
    assert rows[-1]["lr"] < steps_alone  # the time budget drove the decay
    assert json.loads((run.run_dir / "status.json").read_text())["state"] == "finished"


def test_early_stopping_after_evaluations_without_improvement(tmp_path, corpus_jsonl, tokenizer_file, monkeypatch):
    losses = iter([3.0, 2.5, 2.6, 2.7, 2.8, 2.9])
    monkeypatch.setattr(LanguageModelObjective, "evaluate", lambda *args: {"val_loss": next(losses)})
    monkeypatch.setattr(LanguageModelObjective, "describe", lambda self, metrics: f"val loss {metrics['val_loss']}")
    run = tiny(tmp_path, corpus_jsonl, tokenizer_file, "early",
               **{"train.max_steps": 100, "train.eval_steps": 5, "train.early_stopping_patience": 2})
    summary = run.train()
    assert summary["stop_reason"] == "early_stopping" and summary["steps"] == 20 and summary["best_val_loss"] == 2.5
    assert json.loads((run.run_dir / "status.json").read_text())["state"] == "finished"


def test_pruning_keeps_the_newest_checkpoints_and_the_best(tmp_path, corpus_jsonl, tokenizer_file, monkeypatch):
    losses = iter([3.0, 1.0, 2.0, 2.5, 2.6])
    monkeypatch.setattr(LanguageModelObjective, "evaluate", lambda *args: {"val_loss": next(losses)})
    monkeypatch.setattr(LanguageModelObjective, "describe", lambda self, metrics: f"val loss {metrics['val_loss']}")
    run = tiny(tmp_path, corpus_jsonl, tokenizer_file, "pruned",
               **{"train.max_steps": 50, "train.eval_steps": 10, "train.save_steps": 10, "train.keep_checkpoints": 2})
    run.train()
    assert [path.name for path in list_checkpoints(run.run_dir)] == ["checkpoint_step_20", "checkpoint_step_40", "checkpoint_step_50"]


def test_character_tokenizer_and_full_data_directory(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    stanzas = [f"Sonnet {number}: Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n\n" for number in range(300)]
    (data / "poems.txt").write_text("".join(stanzas))
    result = run_script("train.py", "--config", "tiny", "--use-full-data", "--tokenizer-type", "char", "--max-steps", "5",
                        "--val-fraction", "0.2", "--sample-tokens", "5", "--output-dir", "runs", "--run-name", "chars", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tokenizer = json.loads((tmp_path / "runs" / "chars" / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "WordLevel"
    config = json.loads((tmp_path / "runs" / "chars" / "config.json").read_text())
    assert config["model"]["vocab_size"] < 64  # the characters of the poem plus the special tokens
    missing = run_script("train.py", "--config", "tiny", "--use-full-data", cwd=tmp_path / "data")
    assert missing.returncode == 2 and "./data/" in missing.stderr


# --- epochs -----------------------------------------------------------------------------------


def small_text(tmp_path, corpus_jsonl, characters=6000):
    """A .txt file of the corpus's first characters: a few dozen blocks of the tiny preset."""
    text = "\n\n".join(json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines()[:3])[:characters]
    path = tmp_path / "small.txt"
    path.write_text(text, encoding="utf-8")
    return path


def steps_per_epoch(path, tokenizer_file, batch_size=8):
    """One pass over `path` in blocks of the tiny preset, counted by reading its batches, over the batch size."""
    blocks = sum(len(inputs) for inputs, _ in TokenBlockStream([path], load_tokenizer(tokenizer_file), 64, batch_size, loop=False))
    return math.ceil(blocks / batch_size)


def test_num_epochs_trains_whole_passes_and_evaluates_and_saves_at_each_epochs_end(tmp_path, corpus_jsonl, tokenizer_file, caplog):
    caplog.set_level(logging.INFO, logger="minigpt")
    data = small_text(tmp_path, corpus_jsonl)
    epoch_steps = steps_per_epoch(data, tokenizer_file)
    run = tiny(tmp_path, corpus_jsonl, tokenizer_file, "epochs", **{
        "train.data_files": [str(data)], "train.val_data_files": [str(corpus_jsonl)], "train.num_epochs": 2,
        "train.eval_strategy": "epoch", "train.save_strategy": "epoch", "train.log_steps": 2, "train.plot_loss": True})
    assert f"1 epoch = {epoch_steps} steps of 8 sequences" in caplog.text
    summary = run.train()
    assert summary["steps"] == 2 * epoch_steps and summary["stop_reason"] == "max_steps"
    rows = read_metrics(run.run_dir / "metrics.jsonl")
    train = [row for row in rows if row["type"] == "train"]
    assert train and all(row["epoch"] == round(row["step"] / epoch_steps, 4) for row in train)
    assert [(row["step"], row["epoch"]) for row in rows if row["type"] == "eval"] == [(epoch_steps, 1.0), (2 * epoch_steps, 2.0)]
    assert [path.name for path in list_checkpoints(run.run_dir)] == [f"checkpoint_step_{epoch_steps}", f"checkpoint_step_{2 * epoch_steps}"]
    recorded = json.loads((run.run_dir / "config.json").read_text())["train"]
    assert (recorded["epoch_steps"], recorded["max_steps"]) == (epoch_steps, 2 * epoch_steps)  # what --resume continues with
    assert (run.run_dir / "plots" / "loss_curve_latest.png").is_file()


def test_an_explicit_max_steps_caps_the_epochs_and_warmup_ratio_becomes_steps(tmp_path, corpus_jsonl, tokenizer_file, caplog):
    caplog.set_level(logging.INFO, logger="minigpt")
    data = small_text(tmp_path, corpus_jsonl)
    epoch_steps = steps_per_epoch(data, tokenizer_file)
    settings = {"train.data_files": [str(data)], "train.val_fraction": 0.0}
    capped = tiny(tmp_path, corpus_jsonl, tokenizer_file, "capped", **settings, **{
        "train.num_epochs": 3, "train.max_steps": epoch_steps + 1, "train.warmup_ratio": 0.25})
    train = capped.train_config
    assert (train.epoch_steps, train.max_steps) == (epoch_steps, epoch_steps + 1)
    assert (train.warmup_steps, train.warmup_ratio) == (round(0.25 * (epoch_steps + 1)), 0.0)  # recorded as steps
    assert f"Warmup: 25% of {epoch_steps + 1} steps = {train.warmup_steps} steps" in caplog.text
    half = tiny(tmp_path, corpus_jsonl, tokenizer_file, "half", **settings, **{"train.num_epochs": 1.5})
    assert half.train_config.max_steps == math.ceil(1.5 * epoch_steps)  # the preset's 200 steps are replaced
    plain = tiny(tmp_path, corpus_jsonl, tokenizer_file, "plain", **settings, **{"train.max_steps": 5})
    assert plain.train_config.epoch_steps == 0  # no epochs asked: the text is not read an extra time to count them
    floor = tiny(tmp_path, corpus_jsonl, tokenizer_file, "floor", **settings, **{"train.max_steps": 2, "train.min_epochs": 2})
    assert floor.train_config.max_steps == 2 * epoch_steps  # too few steps for 2 epochs of this data: raised
    assert f"2 steps are {2 / epoch_steps:.2g} epochs of this data: raised to {2 * epoch_steps} steps" in caplog.text
    with pytest.raises(UserInputError, match="warmup-ratio"):
        tiny(tmp_path, corpus_jsonl, tokenizer_file, "timed", **settings, **{
            "train.max_steps": 0, "train.max_time": 5.0, "train.warmup_ratio": 0.1})
