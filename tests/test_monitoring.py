"""What the trainer reports about itself: metrics fields, anomalies, profiling, sinks, guards."""

import json
import math
import sys

import pytest
import torch

from conftest import require, run_script
from minigpt.config import apply_overrides, preset_config
from minigpt.errors import UserInputError
from minigpt.metrics import read_metrics
from minigpt.run import prepare_run
from minigpt.trainer import Callback


def tiny_config(tmp_path, corpus_jsonl, tokenizer_file, **overrides):
    settings = {
        "train.data_files": [str(corpus_jsonl)], "train.tokenizer_path": str(tokenizer_file), "train.val_fraction": 0.1,
        "train.output_dir": str(tmp_path / "runs"), "train.run_name": "run", "train.sample_tokens": 0,
        "train.eval_batches": 2, **overrides,
    }
    return apply_overrides(preset_config("tiny"), settings)


@pytest.mark.slow  # 400 float32 steps in a subprocess: about 30 s alone, far more on a loaded machine
def test_overfit_batch_drives_the_loss_to_zero_and_reports_everything(tmp_path, corpus_jsonl, tokenizer_file):
    result = run_script(
        "train.py", "--config", "tiny", "--data-files", str(corpus_jsonl), "--tokenizer", str(tokenizer_file),
        "--val-fraction", "0.1", "--output-dir", "runs", "--run-name", "overfit", "--overfit-batch", "--profile",
        "--tensorboard", "--max-steps", "400", "--log-steps", "25", "--eval-steps", "400", "--dtype", "float32", "--sample-tokens", "0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Where the step time goes" in result.stdout and "backward" in result.stdout
    rows = read_metrics(tmp_path / "runs" / "overfit" / "metrics.jsonl")
    train = [row for row in rows if row["type"] == "train"]
    assert train[-1]["loss"] < 0.1  # a single batch is memorised
    for field in ("tokens_per_second", "mfu", "forward_ms", "backward_ms", "optimizer_ms", "data_ms", "cpu_percent",
                  "rss_bytes", "system_memory_percent", "elapsed_seconds", "eta_seconds", "grad_norm", "lr"):
        assert field in train[-1], field
    assert 0 < train[-1]["mfu"] < 1
    assert any(row["type"] == "anomaly" and row["kind"] == "vanishing_gradient" for row in rows)  # memorised: nothing left to learn
    assert list((tmp_path / "runs" / "overfit" / "tensorboard").glob("events.out.tfevents.*"))


def test_disable_monitoring_leaves_sampling_out(tmp_path, corpus_jsonl, tokenizer_file):
    config = tiny_config(tmp_path, corpus_jsonl, tokenizer_file, **{"train.max_steps": 20, "train.disable_monitoring": True})
    trainer = prepare_run(config, show_progress=False)
    trainer.train()
    train = [row for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row["type"] == "train"]
    assert train and all("cpu_percent" not in row and "mfu" not in row for row in train)


def test_repeated_non_finite_losses_stop_the_run_with_a_checkpoint(tmp_path, corpus_jsonl, tokenizer_file):
    config = tiny_config(tmp_path, corpus_jsonl, tokenizer_file, **{"train.max_steps": 100})
    trainer = prepare_run(config, show_progress=False)
    healthy = trainer.objective.loss
    trainer.objective.loss = lambda model, batch: healthy(model, batch) * float("nan")
    summary = trainer.train()
    assert summary["stop_reason"] == "non_finite_loss" and summary["skipped_steps"] == 5 and summary["steps"] == 5
    status = json.loads((trainer.run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "NaN" in status["message"]
    assert (trainer.run_dir / "checkpoint_step_5" / "model.safetensors").is_file()
    assert not (trainer.run_dir / "final_model").exists()
    assert any(row["type"] == "anomaly" and row["kind"] == "non_finite_loss" for row in read_metrics(trainer.run_dir / "metrics.jsonl"))


def test_deferred_read_back_skips_bad_steps_on_the_device(tmp_path, corpus_jsonl, tokenizer_file):
    """The GPU path, exercised on the CPU: no read-back per step, the fused optimizer skips NaN steps itself."""
    trainer = prepare_run(tiny_config(tmp_path, corpus_jsonl, tokenizer_file, **{"train.max_steps": 100}), show_progress=False)
    trainer.defer_readback = True
    healthy = trainer.objective.loss
    trainer.objective.loss = lambda model, batch: healthy(model, batch) * (float("nan") if trainer.progress.step >= 20 else 1.0)
    weights_at = {}

    class Snapshot(Callback):
        def on_log(self, trainer, row):
            weights_at[row["step"]] = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}

    trainer.callbacks.append(Snapshot())
    summary = trainer.train()
    assert summary["stop_reason"] == "non_finite_loss"
    assert summary["steps"] == 30 and summary["skipped_steps"] == 10  # noticed at the next logging step
    for name, expected in weights_at[20].items():
        assert torch.equal(expected, trainer.model.state_dict()[name]), name  # the poisoned updates never landed


def test_memory_limit_saves_and_stops_instead_of_being_killed(tmp_path, corpus_jsonl, tokenizer_file, monkeypatch):
    config = tiny_config(tmp_path, corpus_jsonl, tokenizer_file, **{"train.max_steps": 100, "train.max_memory": 50.0})
    trainer = prepare_run(config, show_progress=False)
    readings = iter([40.0] * 7 + [97.0] * 100)  # fine for 7 steps, then memory fills up and stays full
    trainer.governor.memory_percent = lambda: next(readings)
    trainer.governor.sleep = lambda seconds: None
    summary = trainer.train()
    # Over the limit, the micro-batch is halved first (8 -> 4 -> 2 -> 1, at steps 8, 9 and 10); at
    # a micro-batch of 1 the run saves and stops.
    assert summary["stop_reason"] == "memory_limit" and summary["steps"] == 11
    assert [row["batch_size"] for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row["type"] == "memory"] == [4, 2, 1]
    assert (trainer.run_dir / "checkpoint_step_11").is_dir()
    assert json.loads((trainer.run_dir / "status.json").read_text())["state"] == "failed"


def test_disable_monitoring_keeps_the_resource_limits_with_a_warning(tmp_path, corpus_jsonl, tokenizer_file, caplog):
    config = tiny_config(tmp_path, corpus_jsonl, tokenizer_file, **{
        "train.max_steps": 100, "train.max_memory": 50.0, "train.max_cpu": 50.0, "train.disable_monitoring": True})
    trainer = prepare_run(config, show_progress=False)
    assert "--disable-monitoring turns off sampling and anomaly checks, but the --max-cpu/--max-memory limits stay in force" in caplog.text
    assert (trainer.governor.max_cpu_percent, trainer.governor.max_memory_percent) == (50.0, 50.0)
    trainer.governor.memory_percent = lambda: 97.0  # memory is full from the first step on
    trainer.governor.sleep = lambda seconds: None
    summary = trainer.train()
    assert summary["stop_reason"] == "memory_limit" and summary["steps"] == 4  # the governor acted: 8 -> 4 -> 2 -> 1, then stop
    rows = read_metrics(trainer.run_dir / "metrics.jsonl")
    assert [row["batch_size"] for row in rows if row["type"] == "memory"] == [4, 2, 1]
    assert all("cpu_percent" not in row for row in rows if row["type"] == "train")  # monitoring itself stayed off


def test_a_missing_sink_package_is_one_clear_sentence(tmp_path, corpus_jsonl, tokenizer_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    config = tiny_config(tmp_path, corpus_jsonl, tokenizer_file, **{"train.tensorboard": True})
    with pytest.raises(UserInputError, match=r'pip install -e "\.\[tensorboard\]"'):
        prepare_run(config, show_progress=False)
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = tiny_config(tmp_path, corpus_jsonl, tokenizer_file, **{"train.wandb": True, "train.run_name": "w"})
    with pytest.raises(UserInputError, match=r"\[wandb\]"):
        prepare_run(config, show_progress=False)
    assert not (tmp_path / "runs" / "run").exists() and not (tmp_path / "runs" / "w").exists()  # nothing half-written


def test_wandb_logs_offline_with_no_network(tmp_path, corpus_jsonl, tokenizer_file, monkeypatch):
    require("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = tiny_config(tmp_path, corpus_jsonl, tokenizer_file, **{"train.max_steps": 10, "train.wandb": True})
    trainer = prepare_run(config, show_progress=False)
    trainer.train()
    assert list((trainer.run_dir / "wandb").glob("offline-run-*"))


def test_disabled_optimizations_and_compiled_runs_both_train(tmp_path, corpus_jsonl, tokenizer_file, caplog, monkeypatch):
    """The same 15 steps twice in float32: eager with every optimisation off, and compiled with
    the fused optimizer. They differ only in rounding, so they end at the same validation loss,
    well below the ln(vocabulary) an untrained model scores."""
    settings = {"train.max_steps": 15, "train.compile": True, "train.dtype": "float32"}
    plain = prepare_run(tiny_config(tmp_path, corpus_jsonl, tokenizer_file, **settings, **{"train.disable_optimizations": True,
                                                                                            "train.run_name": "plain"}), show_progress=False)
    assert plain.optimizer.defaults["foreach"] is False
    eager = plain.train()
    assert eager["steps"] == 15
    untrained = math.log(plain.model.config.vocab_size)
    assert eager["last_val_loss"] < untrained - 0.5
    compiled = prepare_run(tiny_config(tmp_path, corpus_jsonl, tokenizer_file, **settings, **{"train.run_name": "compiled"}),
                           show_progress=False)
    torch._dynamo.reset()  # forget graphs other tests compiled for GPT.forward in this process
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # compiled once, on a batch laid out like the data's
    summary = compiled.train()
    assert "torch.compile failed" not in caplog.text
    assert summary["steps"] == 15 and summary["last_val_loss"] == pytest.approx(eager["last_val_loss"], rel=1e-3)
