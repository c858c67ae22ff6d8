"""Training under torchrun (DDP) on the CPU: two gloo processes of one thread each, tiny runs.

The runs fine-tune for chat from scratch on one-conversation-per-row data, read in order: then
a row is a document, and two processes with one micro-batch each see exactly the rows one
process sees in two micro-batches, so their weights must agree to float rounding. Chat rows
count different numbers of targets, which exercises the all-reduced step weight.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_script

STEPS = 6


def write_chat_file(path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as file:
        for number in range(160):
            turns = [{"role": "user", "content": f"What is {number} plus {number % 7}?"},
                     {"role": "assistant", "content": f"{number} plus {number % 7} is {number + number % 7}." + " Yes." * (number % 4)}]
            file.write(json.dumps({"conversations": turns}) + "\n")
    return path


def run_arguments(data: Path, tokenizer_file: Path, name: str, *extra: str) -> list[str]:
    return ["--config", "tiny", "--stage", "sft", "--data-files", str(data), "--tokenizer", str(tokenizer_file),
            "--output-dir", "runs", "--run-name", name, "--max-steps", str(STEPS), "--batch-size", "2", "--log-steps", "1",
            "--eval-steps", "3", "--save-steps", "2", "--dtype", "float32", "--sample-tokens", "0", "--disable-monitoring",
            "--set", "train.shuffle_buffer=0", *extra]


def torchrun_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "scripts" / "train.py"), *arguments]


def one_thread_environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*arguments), cwd=cwd, env=one_thread_environment(), capture_output=True,
                          text=True, timeout=240)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final_model" / "model.safetensors"))


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ddp")
    write_chat_file(directory / "chat.jsonl")
    return directory


@pytest.fixture(scope="module")
def two_process_run(workspace, tokenizer_file):
    result = torchrun(*run_arguments(workspace / "chat.jsonl", tokenizer_file, "two"), cwd=workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    return workspace / "runs" / "two", result


def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(workspace, tokenizer_file, two_process_run):
    two, _ = two_process_run
    result = run_script("train.py", *run_arguments(workspace / "chat.jsonl", tokenizer_file, "one",
                                                   "--gradient-accumulation-steps", "2"), cwd=workspace)
    assert result.returncode == 0, result.stderr
    one = workspace / "runs" / "one"
    single, double = weights(one), weights(two)
    largest = max(float((single[name] - double[name]).abs().max()) for name in single)
    print(f"largest weight difference, 2 processes vs 1: {largest:.3g}")
    assert largest < 1e-5
    losses = [[(row["type"], row["step"], row.get("loss", row.get("val_loss"))) for row in metric_rows(run)] for run in (one, two)]
    assert [key[:2] for key in losses[0]] == [key[:2] for key in losses[1]]
    assert all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(*losses))  # train losses and the (split, reduced) validation loss


def test_only_rank_zero_writes_and_the_log_states_the_global_batch(two_process_run):
    run, result = two_process_run
    rows = metric_rows(run)
    train_steps = [row["step"] for row in rows if row["type"] == "train"]
    assert train_steps == list(range(1, STEPS + 1))  # one line per step, not one per process
    assert [row["step"] for row in rows if row["type"] == "eval"] == [3, 6]
    assert sorted(path.name for path in run.glob("checkpoint_step_*")) == ["checkpoint_step_2", "checkpoint_step_4", "checkpoint_step_6"]
    assert result.stdout.count("Saved checkpoint") == 3 and result.stdout.count("step 1 | loss") == 1
    assert "2 sequences x 64 tokens x 1 micro-batch(es) x 2 process(es) = 256 tokens per step" in result.stdout
    state = torch.load(run / "checkpoint_step_6" / "state.pt", weights_only=True)
    assert len(state["processes"]) == 2  # both processes' data positions and RNG states
    assert not any(name.startswith("module.") for name in weights(run))  # loads in a single process too
    assert json.loads((run / "summary.json").read_text())["tokens"] == STEPS * 256


def test_sigterm_saves_once_and_resume_continues_identically(workspace, tokenizer_file, two_process_run):
    reference, _ = two_process_run
    run = workspace / "runs" / "interrupted"
    # --max-cpu throttles each process (sleeping between steps), leaving time to interrupt it.
    arguments = run_arguments(workspace / "chat.jsonl", tokenizer_file, "interrupted")
    arguments[arguments.index("--disable-monitoring")] = "--max-cpu=10"
    agent = subprocess.Popen(torchrun_command(*arguments), cwd=workspace, env=one_thread_environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint_step_2").is_dir() and agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)  # to torchrun's agent, which passes it on to both processes
    output = agent.communicate(timeout=120)[0]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped", output
    stopped_at = status["step"]
    assert 2 <= stopped_at < STEPS, output
    assert sorted(run.glob("checkpoint_step_*"))[-1].name == f"checkpoint_step_{stopped_at}"
    assert output.count("Saved checkpoint") == len(list(run.glob("checkpoint_step_*")))  # each once, by rank 0

    resumed = torchrun(*arguments, "--resume", "--max-cpu", "0", cwd=workspace)  # unthrottled: same numbers, sooner
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    finished, expected = weights(run), weights(reference)
    assert all(torch.equal(finished[name], expected[name]) for name in expected)
    losses = [[(row["step"], row["loss"]) for row in metric_rows(path) if row["type"] == "train"] for path in (run, reference)]
    assert losses[0] == losses[1]


def test_resuming_with_another_number_of_processes_is_refused_in_one_sentence(workspace, tokenizer_file, two_process_run):
    arguments = run_arguments(workspace / "chat.jsonl", tokenizer_file, "two", "--resume", "--max-steps", "8")
    result = run_script("train.py", *arguments, cwd=workspace)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert "saved by 2 process(es) and this run has 1" in result.stderr
