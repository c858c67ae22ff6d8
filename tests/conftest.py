"""Shared fixtures: a small JSONL corpus and a tokenizer trained on it once per test session."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt.cli.common import run_subcommand
from minigpt.corpus import builtin_documents
from minigpt.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    """About 300 KB of English documentation as JSONL, one document per line."""
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    size = 0
    with open(path, "w", encoding="utf-8") as file:
        for document in builtin_documents():
            file.write(json.dumps({"text": document}) + "\n")
            size += len(document)
            if size > 300_000:
                break
    return path


@pytest.fixture(scope="session")
def tokenizer_file(corpus_jsonl, tmp_path_factory) -> Path:
    texts = (json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines())
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_bpe_tokenizer(texts, vocab_size=512, show_progress=False).save(path)
    return path


def chat_file(path: Path, count: int = 120) -> Path:
    """`count` short conversations in the `conversations` format, one per line."""
    with open(path, "w", encoding="utf-8") as file:
        for number in range(count):
            turns = [{"role": "user", "content": f"What is {number} times two?"},
                     {"role": "assistant", "content": f"{number} times two is {2 * number}."}]
            file.write(json.dumps({"conversations": turns}) + "\n")
    return path


def run_in_process(command: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """`minigpt COMMAND ARGUMENTS` called in this process, in `cwd`: its exit status and what it
    printed, as `run_script` reports a subprocess's. Seconds faster than a new Python importing
    torch, so every check of a command's flags and messages runs this way; each command keeps one
    real subprocess test (run_script) for its door."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = run_subcommand(command, arguments)
            except SystemExit as exit:  # argparse's --help and usage errors
                status = exit.code if isinstance(exit.code, int) else 0
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["minigpt", command, *arguments], status, out.getvalue(), err.getvalue())


def run_script(script: str, *arguments: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run one of scripts/ as a user would, in `cwd`, capturing its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *arguments],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def memorising_model(tokenizer_file, tmp_path_factory) -> Path:
    """A chat model that answers tests/serving.py's REPLIES word for word (trained once per session)."""
    import torch

    from minigpt.tokenizer import load_tokenizer
    from serving import memorising_chat_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine one thread trains this tiny model many times faster
    try:
        return memorising_chat_model(tmp_path_factory.mktemp("serve") / "final_model", load_tokenizer(tokenizer_file))
    finally:
        torch.set_num_threads(threads)
