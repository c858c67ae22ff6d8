"""kill -9 inside checkpoint writing, then --resume: a loadable checkpoint, no leftovers, the same weights.

The quick test kills once, at the worst instant (a checkpoint written but not yet renamed into
place); the slow one runs the whole drill of benchmarks/fault_drill.py (`pytest -m slow`).
"""

import importlib.util
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from helpers import tiny_arguments
from minigpt.checkpoint import list_checkpoints
from minigpt.files import FAULT_POINT_VARIABLE, LOCK_NAME, TEMPORARY_PREFIX, verify_manifest


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


def load_drill():
    spec = importlib.util.spec_from_file_location("fault_drill", REPO / "benchmarks" / "fault_drill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_drill(tmp_path):
    report = load_drill().run_drill(tmp_path, faults=8, max_steps=60, save_steps=4, seed=1)
    assert report.passed, report.table()
    assert sum(report.faults.values()) >= 4
