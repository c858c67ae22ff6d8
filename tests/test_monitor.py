"""The monitor against a live run, a finished run, a crashed run and a half-written metrics file."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_script
from minigpt.errors import UserInputError
from minigpt.monitor import compare_runs, find_latest_run, loss_chart, read_run, render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(directory, state="finished", pid=None, losses=(5.0, 4.0, 3.0), config_changes=None, torn=False, val=(3.5,)):
    directory.mkdir(parents=True)
    config = {"model": {"n_layer": 2}, "train": {"max_steps": 30, "learning_rate": 1e-3, **(config_changes or {})}, "preset": "tiny"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "status.json").write_text(json.dumps({"state": state, "pid": pid, "step": 10 * len(losses), "updated_at": time.time()}))
    rows = [{"type": "train", "step": 10 * (index + 1), "loss": loss, "tokens_per_second": 1000.0, "grad_norm": 1.0,
             "elapsed_seconds": 5.0 * (index + 1), "eta_seconds": 60.0} for index, loss in enumerate(losses)]
    rows += [{"type": "eval", "step": 10 * (index + 1), "val_loss": loss, "val_perplexity": 2.7**loss, "val_bits_per_byte": 1.0}
             for index, loss in enumerate(val)]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (directory / "metrics.jsonl").write_text(text + ('{"type": "train", "st' if torn else ""))
    return directory


def test_finished_crashed_and_torn_runs(tmp_path):
    finished = read_run(fake_run(tmp_path / "a", torn=True))
    assert finished.state == "finished" and len(finished.train) == 3 and finished.best == 3.5
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = read_run(fake_run(tmp_path / "b", state="running", pid=dead.pid))
    assert crashed.state == "crashed"
    assert "--resume" in render_report(crashed)
    alive = read_run(fake_run(tmp_path / "c", state="running", pid=os.getpid()))
    assert alive.state == "running"
    report = render_report(finished)
    assert "step 30 / 30" in report and "loss now 3.0000" in report and "min 3.0000" in report and "max 5.0000" in report
    assert "validation at step 10" in report


def test_latest_run_and_missing_runs(tmp_path):
    fake_run(tmp_path / "old")
    time.sleep(0.01)
    fake_run(tmp_path / "new")
    assert find_latest_run(tmp_path) == tmp_path / "new"
    with pytest.raises(UserInputError, match="No run found"):
        find_latest_run(tmp_path / "empty")
    with pytest.raises(UserInputError, match="not a run directory"):
        read_run(tmp_path)


def test_comparison_shows_differing_settings_and_the_best_run(tmp_path):
    first = read_run(fake_run(tmp_path / "lr-high", config_changes={"learning_rate": 3e-3}, val=(3.0,)))
    second = read_run(fake_run(tmp_path / "lr-low", config_changes={"learning_rate": 1e-4}, val=(2.5,)))
    table = compare_runs([first, second])
    assert "train.learning_rate" in table and "model.n_layer" not in table
    best_line = next(line for line in table.splitlines() if "<- best" in line)
    assert best_line.startswith("lr-low")


def test_loss_chart_scales_to_its_width():
    chart = loss_chart([float(value) for value in range(100, 0, -1)], width=20)
    assert len(chart) == 20 and chart[0] == "█" and chart[-1] == "▁"
    assert loss_chart([2.0, float("nan")], width=10) == "▁"


def test_monitor_script_follows_a_live_run_then_sees_it_crash(tmp_path, corpus_jsonl, tokenizer_file):
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", "tiny", "--data-files", str(corpus_jsonl),
               "--tokenizer", str(tokenizer_file), "--val-fraction", "0.1", "--output-dir", "runs", "--run-name", "live",
               "--max-steps", "1000000", "--log-steps", "5", "--sample-tokens", "0"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "runs" / "live" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
            time.sleep(0.05)
        live = run_script("monitor_training.py", "--checkpoints-dir", "runs", "--once", cwd=tmp_path)
        assert live.returncode == 0, live.stderr
        assert "[running]" in live.stdout and "tokens/s" in live.stdout and "step" in live.stdout
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    crashed = run_script("monitor_training.py", str(tmp_path / "runs" / "live"), cwd=tmp_path)  # returns: the run is not live
    assert crashed.returncode == 0 and "[crashed]" in crashed.stdout


def test_plot_training_curves_script(tmp_path):
    first, second = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", losses=(6.0, 5.0, 4.5))
    result = run_script("plot_training_curves.py", "--checkpoint-dir", str(first), str(second), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == PNG_SIGNATURE
    single = run_script("plot_training_curves.py", "--checkpoint-dir", str(first), cwd=tmp_path)
    assert (first / "plots" / "training_curves.png").is_file() and str(first / "plots") in single.stdout
    empty = run_script("plot_training_curves.py", "--checkpoint-dir", str(tmp_path / "nothing"), cwd=tmp_path)
    assert empty.returncode == 2 and "no metrics.jsonl rows" in empty.stderr and "Traceback" not in empty.stderr
