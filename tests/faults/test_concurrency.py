"""Two trainers, one run directory: the second is refused; a lock left by a killed trainer is taken over."""

import logging
import multiprocessing
import os
import subprocess
import sys
import time

import psutil
import pytest

from helpers import assert_one_sentence, tiny_arguments
from minigpt.cli.train import main as train_main
from minigpt.config import apply_overrides, load_config
from minigpt.errors import UserInputError
from minigpt.files import LOCK_NAME, lock_run_directory, unlock_run_directory
from minigpt.run import prepare_run


@pytest.fixture
def other_trainer():
    """A live process standing in for another trainer."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_owner_keeps_the_lock(tmp_path, other_trainer):
    (tmp_path / LOCK_NAME).write_text(f"{other_trainer}\n")
    with pytest.raises(UserInputError) as error:
        lock_run_directory(tmp_path)
    assert_one_sentence(str(error.value), "in use by another trainer", f"pid {other_trainer}", LOCK_NAME)
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(other_trainer)  # untouched


@pytest.mark.parametrize("content", ["dead", "", "garbled"])
def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path, caplog, content):
    (tmp_path / LOCK_NAME).write_text(str(dead_pid()) if content == "dead" else content)
    with caplog.at_level(logging.WARNING, logger="minigpt.files"):
        lock_run_directory(tmp_path)
    assert "Taking over the lock" in caplog.text and "no longer running" in caplog.text
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    unlock_run_directory(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_same_process_may_lock_again_and_unlock_leaves_others_locks_alone(tmp_path, other_trainer):
    lock_run_directory(tmp_path)
    lock_run_directory(tmp_path)  # a notebook preparing the same run twice
    unlock_run_directory(tmp_path)
    (tmp_path / LOCK_NAME).write_text(f"{other_trainer}\n")
    unlock_run_directory(tmp_path)  # not ours: stays
    assert (tmp_path / LOCK_NAME).exists()


def test_a_second_trainer_is_refused_before_writing_anything(tmp_path, monkeypatch, capsys, other_trainer, corpus_jsonl,
                                                              tokenizer_file):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "shared"
    run.mkdir(parents=True)
    (run / LOCK_NAME).write_text(f"{other_trainer}\n")
    status = train_main(tiny_arguments(corpus_jsonl, tokenizer_file, "shared", "--max-steps", "2"))
    assert status == 2
    assert_one_sentence(capsys.readouterr().err, "error: Run directory", "in use by another trainer")
    assert [path.name for path in run.iterdir()] == [LOCK_NAME]


def test_the_lock_is_held_while_training_and_released_at_the_end(tmp_path, corpus_jsonl, tokenizer_file):
    config = apply_overrides(load_config("tiny"), {
        "train.data_files": [str(corpus_jsonl)], "train.tokenizer_path": str(tokenizer_file), "train.dtype": "float32",
        "train.output_dir": str(tmp_path), "train.run_name": "locked", "train.max_steps": 2, "train.eval_steps": 1000,
        "train.eval_batches": 1, "train.sample_tokens": 0, "train.val_fraction": 0.1,
    })
    trainer = prepare_run(config, show_progress=False)
    assert (tmp_path / "locked" / LOCK_NAME).read_text().strip() == str(os.getpid())
    trainer.train()
    assert not (tmp_path / "locked" / LOCK_NAME).exists()


def race_for_the_lock(run_dir, start, winners) -> None:
    """One of several trainers starting at once: take the lock, say so, hold it a moment."""
    import minigpt.files

    real_fdopen = os.fdopen

    def slow_fdopen(*arguments, **keywords):  # a busy machine: this process is descheduled while it writes
        time.sleep(0.3)
        return real_fdopen(*arguments, **keywords)

    minigpt.files.os.fdopen = slow_fdopen
    original_open = open

    def slow_open(file, mode="r", *arguments, **keywords):
        if "w" in mode:
            time.sleep(0.3)
        return original_open(file, mode, *arguments, **keywords)

    minigpt.files.open = slow_open  # whichever way the owner's pid is written
    start.wait()
    try:
        lock_run_directory(run_dir)
    except UserInputError:
        return
    winners.put(os.getpid())
    time.sleep(2)  # holding it while the others try


def assert_one_winner(racers, winners, start=None) -> None:
    """Start the racing processes (then `start`, if given, lets them go), wait for them, and check
    that exactly one of them reported holding the lock."""
    for racer in racers:
        racer.start()
    if start is not None:
        start.set()
    for racer in racers:
        racer.join(timeout=60)
    won = []
    while not winners.empty():
        won.append(winners.get())
    assert len(won) == 1, f"{len(won)} trainers hold the lock at once"


def test_of_trainers_starting_at_once_exactly_one_takes_the_lock(tmp_path):
    """The lock's owner is written into it, and a busy machine can stop a process between creating
    the lock and writing its pid: another trainer must not take that empty lock for a stale one."""
    context = multiprocessing.get_context("fork")
    start, winners = context.Event(), context.Queue()
    racers = [context.Process(target=race_for_the_lock, args=(tmp_path, start, winners)) for _ in range(6)]
    assert_one_winner(racers, winners, start)


def take_over_a_stale_lock(run_dir, checked, winners) -> None:
    """One of two trainers that find the same stale lock: each pauses between seeing that the lock's
    owner is gone and taking it over until the other has seen it too (or, where takeovers are
    serialized, until the other cannot: then the pause ends after a second and a half)."""
    import threading

    real_pid_exists = psutil.pid_exists

    def pid_exists_then_pause(pid):
        alive = real_pid_exists(pid)
        try:
            checked.wait(timeout=1.5)
        except threading.BrokenBarrierError:
            pass
        return alive

    psutil.pid_exists = pid_exists_then_pause
    try:
        lock_run_directory(run_dir)
    except UserInputError:
        return
    winners.put(os.getpid())
    time.sleep(3)  # holding it while the other decides


def test_of_two_trainers_taking_over_the_same_stale_lock_exactly_one_wins(tmp_path):
    """Both see a dead trainer's lock; the first removes it and takes the lock; the second, acting on
    what it saw, removed the first one's fresh lock and took it too: two trainers in one directory."""
    (tmp_path / LOCK_NAME).write_text(f"{dead_pid()}\n")
    context = multiprocessing.get_context("fork")
    checked, winners = context.Barrier(2), context.Queue()
    racers = [context.Process(target=take_over_a_stale_lock, args=(tmp_path, checked, winners)) for _ in range(2)]
    assert_one_winner(racers, winners)
