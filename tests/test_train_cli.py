"""scripts/train.py end to end, as a user runs it: a subprocess on the tiny preset."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, run_in_process, run_script
from minigpt.generation import SamplingConfig, generate
from minigpt.model_folder import load
from minigpt.tokenizer import load_tokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_file_metadata(path):
    with safe_open(str(path), framework="pt") as file:
        return file.metadata()


def tiny_run(corpus_jsonl, tokenizer_file, *extra: str) -> list[str]:
    return ["--config", "tiny", "--data-files", str(corpus_jsonl), "--tokenizer", str(tokenizer_file),
            "--output-dir", "runs", "--sample-tokens", "8", "--val-fraction", "0.1", "--dtype", "float32", *extra]


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.count("\n") == 0, message
    for fragment in fragments:
        assert fragment in message


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_jsonl, tokenizer_file):
    """A complete 30-step tiny run, shared by the tests that read its outputs."""
    directory = tmp_path_factory.mktemp("finished")
    result = run_script("train.py", *tiny_run(corpus_jsonl, tokenizer_file, "--max-steps", "30", "--eval-steps", "15",
                                              "--save-steps", "15", "--log-steps", "5", "--plot-loss", "--run-name", "e2e"),
                        cwd=directory)
    assert result.returncode == 0, result.stderr
    return directory / "runs" / "e2e", result


def test_a_run_leaves_a_complete_run_directory(finished_run):
    run, result = finished_run
    for name in ["config.json", "tokenizer.json", "metrics.jsonl", "status.json", "summary.json",
                 "checkpoint_step_15/model.safetensors", "checkpoint_step_30/state.pt", "checkpoint_step_30/meta.json",
                 "final_model/model.safetensors", "final_model/config.json", "final_model/tokenizer.json"]:
        assert (run / name).is_file(), name
    for name in ["loss_curve_step_15.png", "loss_curve_step_30.png", "loss_curve_latest.png", "loss_curve_final_step_30.png"]:
        assert (run / "plots" / name).read_bytes()[:8] == PNG_SIGNATURE, name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["type"] == "train"]
    eval_rows = [row for row in rows if row["type"] == "eval"]
    assert [row["step"] for row in train_rows] == [5, 10, 15, 20, 25, 30]
    assert [row["step"] for row in eval_rows] == [15, 30]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns
    assert all(row["val_bits_per_byte"] > 0 for row in eval_rows)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 30
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["stop_reason"] == "max_steps" and summary["tokens"] == 30 * 8 * 64
    assert "step 30 | loss" in result.stdout and "tok/s" in result.stdout
    loaded = load(run / "final_model")
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    assert config.model.vocab_size == tokenizer.vocab_size
    text = tokenizer.decode(generate(model, [tokenizer.eos_id], SamplingConfig(max_new_tokens=10, seed=0)))
    assert isinstance(text, str) and len(text) > 0


@pytest.mark.slow  # a kill drill: three runs of 90 steps in subprocesses
def test_killed_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, corpus_jsonl, tokenizer_file):
    """Killed at step 40, in the middle of its second epoch, and resumed from that checkpoint: the
    same weights and the same metrics rows (epochs, losses, evaluations at each epoch's end)."""
    steps = ["--max-data-size", "10", "--num-epochs", "3", "--save-steps", "40", "--eval-strategy", "epoch", "--log-steps", "10"]
    straight = run_script("train.py", *tiny_run(corpus_jsonl, tokenizer_file, *steps, "--run-name", "straight"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    epoch_steps = json.loads((tmp_path / "runs" / "straight" / "config.json").read_text())["train"]["epoch_steps"]
    assert 20 < epoch_steps < 40  # the kill below falls in the second epoch

    command = [sys.executable, str(REPO / "scripts" / "train.py"),
               *tiny_run(corpus_jsonl, tokenizer_file, *steps, "--run-name", "killed")]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = tmp_path / "runs" / "killed" / "checkpoint_step_40"
    deadline = time.time() + 120
    while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "runs" / "killed" / "final_model").exists()

    resumed = run_script("train.py", "--resume", "--run-name", "killed", "--output-dir", "runs", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stdout
    expected = load_file(tmp_path / "runs" / "straight" / "final_model" / "model.safetensors")
    actual = load_file(tmp_path / "runs" / "killed" / "final_model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name

    def learning(run):  # what the rows say about learning (timings differ between runs)
        rows = [json.loads(line) for line in (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        return [(row["type"], row["step"], row["epoch"], row.get("loss"), row.get("lr"), row.get("val_loss"))
                for row in rows if row["type"] in ("train", "eval")]

    # rows logged after the checkpoint by the killed run were dropped, and the resumed run wrote them again
    assert learning("killed") == learning("straight")
    assert [row[1:3] for row in learning("straight") if row[0] == "eval"] == [(epoch_steps * n, float(n)) for n in (1, 2, 3)]


def test_a_time_budget_stops_cleanly_with_a_saved_model(tmp_path, corpus_jsonl, tokenizer_file):
    result = run_script("train.py", *tiny_run(corpus_jsonl, tokenizer_file, "--max-steps", "1000000", "--max-time", "4",
                                              "--run-name", "timed"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "timed"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "max_time" and 4 <= summary["training_seconds"] < 30
    assert (run / "final_model" / "model.safetensors").is_file()
    assert summary["last_val_loss"] is not None  # evaluated before stopping


def test_sigterm_saves_a_checkpoint_and_exits_with_the_signal_status(tmp_path, corpus_jsonl, tokenizer_file):
    command = [sys.executable, str(REPO / "scripts" / "train.py"),
               *tiny_run(corpus_jsonl, tokenizer_file, "--max-steps", "1000000", "--run-name", "stopped")]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "stopped" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    # Not 0: the run did not finish; 128 + the signal, as a shell reports it, so a scheduler can
    # tell preemption from completion.
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    run = tmp_path / "runs" / "stopped"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and "--resume" in status["message"]
    checkpoint = run / f"checkpoint_step_{status['step']}"
    assert (checkpoint / "model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["stop_signal"] == "SIGTERM"
    # A checkpoint is self-contained: copied anywhere, it loads alone (config and tokenizer inside).
    copy = tmp_path / "elsewhere" / "copied"
    shutil.copytree(checkpoint, copy)
    loaded = load(copy)
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    assert config.model.vocab_size == tokenizer.vocab_size and model.num_parameters() > 0
    assert load_file_metadata(copy / "model.safetensors")["format"] == "pt"


def test_the_built_in_corpus_is_used_when_no_data_is_given(tmp_path):
    result = run_script("train.py", "--config", "tiny", "--max-steps", "4", "--eval-batches", "1", "--tokenizer-samples", "300",
                        "--output-dir", "runs", "--run-name", "builtin", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Training a bpe tokenizer" in result.stdout
    assert list((tmp_path / "runs" / "tokenizers").glob("bpe-512-*.json"))
    again = run_script("train.py", "--config", "tiny", "--max-steps", "2", "--eval-batches", "1", "--tokenizer-samples", "300",
                       "--output-dir", "runs", "--run-name", "builtin-again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Reusing tokenizer" in again.stdout


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (["--lr-scheduler", "exponential"], ["invalid choice", "exponential"]),
        (["--batch-size", "0"], ["batch_size must be positive"]),
        (["--batch-size", "many"], ["expected a number or auto", "many"]),
        (["--set", "model.n_head=3"], ["must divide model.n_embd"]),
        (["--config", "enormous"], ["neither a preset"]),
        (["--data-files", "missing.jsonl"], ["missing.jsonl"]),
        (["--resume", "--run-name", "never-ran"], ["never-ran"]),
    ],
)
def test_bad_input_gets_one_clear_line_and_exit_status_2(tmp_path, tokenizer_file, arguments, fragments):
    result = run_in_process("train", "--config", "tiny", "--tokenizer", str(tokenizer_file), "--output-dir", "runs",
                            *arguments, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not any(path.is_file() for path in (tmp_path / "runs").rglob("*")) if (tmp_path / "runs").exists() else True


def test_a_broken_jsonl_file_is_refused_in_one_line(tmp_path, tokenizer_file):
    broken = tmp_path / "broken.jsonl"
    broken.write_text("this is not json\n" * 50)
    result = run_in_process("train", "--config", "tiny", "--tokenizer", str(tokenizer_file), "--output-dir", "runs",
                            "--data-files", str(broken), cwd=tmp_path)
    assert_one_line_error(result, "broken.jsonl")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))


def test_a_few_broken_lines_are_reported_and_skipped(tmp_path, corpus_jsonl, tokenizer_file):
    lines = corpus_jsonl.read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(lines[:40] + ["{broken", '{"title": "no text"}'] + lines[40:]) + "\n")
    result = run_script("train.py", *tiny_run(mixed, tokenizer_file, "--max-steps", "3", "--run-name", "mixed"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "mixed.jsonl:41" in output and "mixed.jsonl:42" in output


def test_generate_script_streams_text_from_a_model(finished_run, tmp_path):
    run, _ = finished_run
    result = run_script("generate.py", str(run / "final_model"), "--prompt", "The", "--prompt", "def", "--max-new-tokens", "12",
                        "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert result.stdout.startswith("The") and len(result.stdout) > 10
    again = run_script("generate.py", str(run), "--prompt", "The", "--prompt", "def", "--max-new-tokens", "12", "--seed", "1",
                       "--no-kv-cache", cwd=tmp_path)  # a run directory works too, and the cache changes nothing
    assert again.stdout == result.stdout and lines
    checkpoint = run_script("generate.py", str(run / "checkpoint_step_15"), "--max-new-tokens", "5", cwd=tmp_path)
    assert checkpoint.returncode == 0, checkpoint.stderr


def test_evaluate_script_reports_loss_perplexity_and_bits_per_byte(finished_run, corpus_jsonl, tmp_path):
    run, _ = finished_run
    result = run_script("evaluate.py", str(run / "final_model"), "--data-files", str(corpus_jsonl), "--max-batches", "3",
                        "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)["text"]
    assert figures["perplexity"] == pytest.approx(math.exp(figures["loss"]), rel=1e-6)
    assert 0 < figures["bits_per_byte"] < 8 and figures["tokens"] == 3 * 8 * 64


def test_train_tokenizer_script(tmp_path, corpus_jsonl):
    result = run_script("train_tokenizer.py", "--data-files", str(corpus_jsonl), "--vocab-size", "300", "--output", "tok.json",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_tokenizer(tmp_path / "tok.json").vocab_size == 300
    assert "characters per token" in result.stdout


@pytest.mark.parametrize(
    "command, arguments, fragments",
    [
        ("generate", ["nowhere"], ["nowhere", "does not exist"]),
        ("generate", ["{run}", "--top-p", "0"], ["--top-p"]),
        ("evaluate", ["{run}", "--data-files", "missing.jsonl"], ["missing.jsonl"]),
        ("tokenizer", ["--vocab-size", "10"], ["at least 260"]),
    ],
)
def test_companion_commands_refuse_bad_input_in_one_line(finished_run, tmp_path, command, arguments, fragments):
    run, _ = finished_run
    result = run_in_process(command, *[argument.format(run=run) for argument in arguments], cwd=tmp_path)
    assert_one_line_error(result, *fragments)
