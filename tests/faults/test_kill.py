"""kill -9 inside checkpoint writing, then --resume: a loadable checkpoint, no leftovers, the same weights.

The drills kill at the worst instant (a checkpoint written but not yet renamed into place),
or just after a checkpoint (to compare the resumed run with an uninterrupted one: pretraining
with dropout, with data-loader workers, chat fine-tuning and LoRA); the longest runs the whole
drill of benchmarks/fault_drill.py. Every one starts training subprocesses and kills them, so
they all run in CI's slow stage, after the suite (`pytest -m slow`).
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, chat_file
from helpers import assert_one_sentence, tiny_arguments
from minigpt.checkpoint import latest_checkpoint, list_checkpoints
from minigpt.model_folder import LORA_ADAPTER_WEIGHTS, save_model_directory
from minigpt.cli.train import main as train_main
from minigpt.config import apply_overrides, preset_config
from minigpt.files import FAULT_POINT_VARIABLE, LOCK_NAME, TEMPORARY_PREFIX, verify_manifest
from minigpt.model import GPT
from minigpt.stages.pretrain import dataloader_workers
from minigpt.runtime import select_device
from minigpt.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

KILL_AFTER_STEP_4 = "after_rename_before_prune@2"  # with --save-steps 2: checkpoint_step_4 is in place, then SIGKILL
EIGHT_STEPS = ("--max-steps", "8", "--save-steps", "2")


def train(tmp_path, arguments, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, FAULT_POINT_VARIABLE: fault} if fault else {k: v for k, v in os.environ.items() if k != FAULT_POINT_VARIABLE}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *arguments], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_kill_before_the_rename_loses_nothing(tmp_path, corpus_jsonl, tokenizer_file):
    run = tmp_path / "runs" / "killed"
    killed = train(tmp_path, tiny_arguments(corpus_jsonl, tokenizer_file, "killed", "--max-steps", "6", "--save-steps", "2"),
                   fault="before_rename@2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [path.name for path in list_checkpoints(run)] == ["checkpoint_step_2"]
    assert list(run.glob(f"{TEMPORARY_PREFIX}checkpoint_step_4-*"))  # the complete but unrenamed checkpoint 4
    assert (run / LOCK_NAME).exists()  # a stale lock, taken over by the resumed run

    resumed = train(tmp_path, ["--resume", "--run-name", "killed", "--output-dir", "runs"])
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from runs/killed/checkpoint_step_2" in resumed.stdout and "Taking over the lock" in resumed.stdout
    assert not list(run.glob(f"{TEMPORARY_PREFIX}*")) and not (run / LOCK_NAME).exists()
    for directory in [*list_checkpoints(run), run / "final_model"]:
        assert verify_manifest(directory), directory


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """What a run trained, from its final_model/: the whole model, or a LoRA run's adapters."""
    adapter = run / "final_model" / LORA_ADAPTER_WEIGHTS
    return load_file(adapter if adapter.is_file() else run / "final_model" / "model.safetensors")


def assert_a_kill_and_resume_is_bit_identical(tmp_path, monkeypatch, arguments: Callable[[str], list[str]]) -> None:
    """Train `arguments(run_name)` straight through in this process; train it again in a process
    killed with SIGKILL just after its step-4 checkpoint, resume that with --resume as a user
    would, and check that both final models are equal bit for bit."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(FAULT_POINT_VARIABLE, raising=False)
    assert train_main(arguments("straight")) == 0
    killed = train(tmp_path, arguments("killed"), fault=KILL_AFTER_STEP_4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = tmp_path / "runs" / "killed"
    assert latest_checkpoint(run) == run / "checkpoint_step_4" and not (run / "final_model").exists()
    assert train_main(["--resume", "--run-name", "killed", "--output-dir", "runs"]) == 0
    expected, actual = final_weights(tmp_path / "runs" / "straight"), final_weights(run)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_a_kill_with_dropout_resumes_bit_identically(tmp_path, monkeypatch, corpus_jsonl, tokenizer_file):
    """Dropout draws new masks from the global generator at every step: a resume that did not
    restore the generator's state would train the last four steps with other masks."""
    assert_a_kill_and_resume_is_bit_identical(tmp_path, monkeypatch, lambda name: tiny_arguments(
        corpus_jsonl, tokenizer_file, name, "--set", "model.dropout=0.1", *EIGHT_STEPS))


def test_a_kill_with_dataloader_workers_resumes_bit_identically(tmp_path, monkeypatch, corpus_jsonl, tokenizer_file):
    """Two worker processes read the data; the resumed run replays their batches up to the checkpoint."""
    assert_a_kill_and_resume_is_bit_identical(tmp_path, monkeypatch, lambda name: tiny_arguments(
        corpus_jsonl, tokenizer_file, name, "--dataloader-workers", "2", *EIGHT_STEPS))
    saved = json.loads((tmp_path / "runs" / "killed" / "config.json").read_text())
    assert saved["train"]["dataloader_workers"] == 2


def test_a_resume_with_another_number_of_dataloader_workers_is_refused(tmp_path, monkeypatch, capsys, corpus_jsonl, tokenizer_file):
    """The batch order depends on the number of workers, so a position saved with one number means
    nothing with another. -1 (auto) is recorded as the number it meant on the device that started
    the run, so a plain --resume elsewhere keeps it; asking for another number is refused."""
    monkeypatch.chdir(tmp_path)
    assert train_main(tiny_arguments(corpus_jsonl, tokenizer_file, "auto", "--max-steps", "2", "--save-steps", "2")) == 0
    run = tmp_path / "runs" / "auto"
    recorded = json.loads((run / "config.json").read_text())["train"]["dataloader_workers"]
    assert recorded == dataloader_workers(-1, select_device("auto"))  # 0 on a CPU, up to 4 on a CUDA GPU
    other = recorded + 2
    config_before = (run / "config.json").read_bytes()
    capsys.readouterr()
    status = train_main(["--resume", "--run-name", "auto", "--output-dir", "runs", "--max-steps", "4",
                         "--dataloader-workers", str(other)])
    assert status == 2
    assert_one_sentence(capsys.readouterr().err, f"saved with {recorded} data-loader worker(s) and this run has {other}",
                        f"resume with --dataloader-workers {recorded}")
    assert (run / "config.json").read_bytes() == config_before and not (run / LOCK_NAME).exists()  # nothing changed


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tokenizer_file) -> Path:
    """A tiny model directory with the shared tokenizer, for --init-from (resuming needs no trained weights)."""
    tokenizer = load_tokenizer(tokenizer_file)
    config = apply_overrides(preset_config("tiny"), {"model.vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    return save_model_directory(tmp_path_factory.mktemp("base") / "final_model", GPT(config.model), config, tokenizer)


@pytest.mark.parametrize("adapter", [
    pytest.param((), marks=pytest.mark.slow, id="sft"),  # the LoRA case reads the same chat rows; test_finetune resumes full SFT quickly
    pytest.param(("--lora-rank", "4", "--lora-dropout", "0.1"), id="sft-lora"),
])
def test_a_kill_during_chat_fine_tuning_resumes_bit_identically(tmp_path, monkeypatch, base_model, adapter):
    """Conversations one per row, the assistant-only mask, dropout, and for LoRA a checkpoint of
    adapters that refers to the frozen base: all continue exactly after a SIGKILL."""
    data = chat_file(tmp_path / "chat.jsonl")
    assert_a_kill_and_resume_is_bit_identical(tmp_path, monkeypatch, lambda name: [
        "--stage", "sft", "--init-from", str(base_model), "--data-files", str(data), "--dtype", "float32",
        "--output-dir", "runs", "--run-name", name, "--sample-tokens", "0", "--val-fraction", "0.1", "--eval-steps", "1000",
        "--eval-batches", "1", "--set", "model.dropout=0.1", *adapter, *EIGHT_STEPS])


def load_drill():
    spec = importlib.util.spec_from_file_location("fault_drill", REPO / "benchmarks" / "fault_drill.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_drill(tmp_path):
    report = load_drill().run_drill(tmp_path, faults=8, max_steps=60, save_steps=4, seed=1)
    assert report.passed, report.table()
    assert sum(report.faults.values()) >= 4
