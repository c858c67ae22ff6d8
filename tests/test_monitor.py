"""The monitor against a live run (its refresh loop), a stalled, a finished and a crashed run, a
half-written metrics file, and the comparison of runs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_script
from minigpt.cli import monitor as monitor_command
from minigpt.errors import UserInputError
from minigpt.monitor import STALE_SECONDS, compare_runs, find_latest_run, loss_chart, read_run, render_report

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


def write_status(run, **fields) -> None:
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, **fields}))


def test_a_stalled_run_is_told_apart_from_a_running_one(tmp_path):
    run = fake_run(tmp_path / "stuck", state="running", pid=os.getpid())
    write_status(run, updated_at=time.time() - STALE_SECONDS - 60)  # alive, but silent for eleven minutes
    report = read_run(run)
    assert report.state == "stalled"
    screen = render_report(report)
    assert "[stalled]" in screen and "no update for over 10 minutes" in screen and "ETA 1m00s" in screen
    write_status(run, updated_at=time.time())
    assert read_run(run).state == "running"


def test_the_refresh_loop_redraws_until_the_run_ends(tmp_path, monkeypatch, capsys):
    """Watching a stalled run: it wakes up, logs a step, finishes; the monitor redraws at each
    interval (a stalled run is still live) and returns by itself once the run has ended."""
    run = fake_run(tmp_path / "watched", state="running", pid=os.getpid())
    write_status(run, updated_at=time.time() - STALE_SECONDS - 60)
    pauses = []

    def the_run_moves_on(seconds):  # what happens in the run while the monitor waits
        pauses.append(seconds)
        if len(pauses) == 1:
            with open(run / "metrics.jsonl", "a") as metrics:
                metrics.write(json.dumps({"type": "train", "step": 40, "loss": 2.5, "elapsed_seconds": 20.0, "eta_seconds": 5.0}) + "\n")
            write_status(run, step=40, updated_at=time.time())
        else:
            write_status(run, state="finished", step=40, message="Reached max_steps.")

    monkeypatch.setattr(monitor_command.time, "sleep", the_run_moves_on)
    assert monitor_command.main([str(run), "--interval", "0.5"]) == 0
    screens = capsys.readouterr().out.split("(refreshing every 0.5 s; Ctrl-C to stop watching, the run goes on)")
    assert pauses == [0.5, 0.5] and len(screens) == 3  # two live screens, then the last one without the refresh line
    assert "[stalled]" in screens[0] and "step 30 / 30" in screens[0]
    assert "[running]" in screens[1] and "loss now 2.5000" in screens[1] and "ETA 0m05s" in screens[1]
    assert "[finished]" in screens[2] and "Reached max_steps." in screens[2] and "ETA" not in screens[2]


def test_compare_from_the_command_line(tmp_path, capsys):
    fast = fake_run(tmp_path / "fast", config_changes={"learning_rate": 3e-3}, val=(3.0, 2.0))
    slow = fake_run(tmp_path / "slow", config_changes={"learning_rate": 1e-4}, val=(2.5,))
    assert monitor_command.main([str(fast), str(slow), "--compare"]) == 0
    header, rule, *rows = capsys.readouterr().out.strip().splitlines()
    assert [cell.strip() for cell in header.split(" | ")][3:] == ["train.learning_rate", "best val loss"]
    assert rows[0].split(" | ")[0].strip() == "fast" and rows[0].endswith("2.0000 <- best")  # its best, not its last
    assert rows[1].split(" | ")[-1].strip() == "2.5000"


def test_monitor_script_follows_a_live_run_then_sees_it_crash(tmp_path, corpus_jsonl, tokenizer_file):
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", "tiny", "--data-files", str(corpus_jsonl),
               "--tokenizer", str(tokenizer_file), "--val-fraction", "0.1", "--output-dir", "runs", "--run-name", "live",
               "--max-steps", "1000000", "--log-steps", "5", "--sample-tokens", "0"]
    training = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    screen = tmp_path / "monitor.out"
    try:
        metrics = tmp_path / "runs" / "live" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
            time.sleep(0.05)
        with open(screen, "w") as output:  # the refresh loop, as a user runs it: no --once
            monitor = subprocess.Popen([sys.executable, str(REPO / "scripts" / "monitor_training.py"), "--checkpoints-dir", "runs",
                                        "--interval", "0.2"], cwd=tmp_path, stdout=output, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while screen.read_text().count("refreshing every 0.2 s") < 2 and monitor.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # two live screens drawn
    finally:
        training.send_signal(signal.SIGKILL)
        training.wait()
    _, errors = monitor.communicate(timeout=60)  # the run is gone: the monitor notices and returns by itself
    assert monitor.returncode == 0, errors
    live, *_, last = screen.read_text().split("(refreshing every 0.2 s; Ctrl-C to stop watching, the run goes on)")
    assert "[running]" in live and "tokens/s" in live and "step" in live
    assert "[crashed]" in last and "--resume" in last
    once = run_script("monitor_training.py", str(tmp_path / "runs" / "live"), "--once", cwd=tmp_path)
    assert once.returncode == 0 and "[crashed]" in once.stdout


def test_plot_training_curves_script(tmp_path):
    first, second = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", losses=(6.0, 5.0, 4.5))
    result = run_script("plot_training_curves.py", "--checkpoint-dir", str(first), str(second), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == PNG_SIGNATURE
    single = run_script("plot_training_curves.py", "--checkpoint-dir", str(first), cwd=tmp_path)
    assert (first / "plots" / "training_curves.png").is_file() and str(first / "plots") in single.stdout
    empty = run_script("plot_training_curves.py", "--checkpoint-dir", str(tmp_path / "nothing"), cwd=tmp_path)
    assert empty.returncode == 2 and "no metrics.jsonl rows" in empty.stderr and "Traceback" not in empty.stderr
