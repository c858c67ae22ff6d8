"""The loop's arithmetic and its stopping rules, checked in-process on the tiny preset."""

import json

import torch

from conftest import run_script
from minigpt.checkpoint import list_checkpoints
from minigpt.config import apply_overrides, preset_config
from minigpt.metrics import read_metrics
from minigpt.objective import LanguageModelObjective
from minigpt.optim import learning_rate_at
from minigpt.run import prepare_run


def tiny(tmp_path, corpus_jsonl, tokenizer_file, name, **overrides):
    settings = {
        "train.data_files": [str(corpus_jsonl)], "train.tokenizer_path": str(tokenizer_file), "train.val_fraction": 0.1,
        "train.output_dir": str(tmp_path / "runs"), "train.run_name": name, "train.sample_tokens": 0, "train.eval_batches": 1,
        "train.shuffle_buffer": 0, "train.disable_monitoring": True, "train.dtype": "float32", **overrides,
    }
    return prepare_run(apply_overrides(preset_config("tiny"), settings), show_progress=False)


def test_accumulating_micro_batches_equals_one_large_batch(tmp_path, corpus_jsonl, tokenizer_file):
    one = tiny(tmp_path, corpus_jsonl, tokenizer_file, "one", **{"train.batch_size": 8, "train.max_steps": 1})
    accumulated = tiny(tmp_path, corpus_jsonl, tokenizer_file, "two",
                       **{"train.batch_size": 4, "train.gradient_accumulation_steps": 2, "train.max_steps": 1})
    one.train()
    accumulated.train()
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
