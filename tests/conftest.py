"""Shared fixtures: a small JSONL corpus and a tokenizer trained on it once per test session.

Optional packages. The core must be tested without the optional packages that the export tests
compare against (transformers, peft, gguf): with MINIGPT_HIDE_OPTIONAL=1 this file hides them from
every import, so a bug that only those comparisons would see shows up as a missed bug (CI runs
the core tests once so). A test that needs an optional package asks for it with `require(name)`
(or `optional(name)`, a module whose first use asks): where it is missing the test is skipped,
that test alone; under CI=true, where every optional package is installed, a missing one fails
the test instead, so a broken install cannot pass as a row of skips. A package hidden on purpose
is skipped under CI too.
"""

import contextlib
import importlib
import importlib.abc
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

HIDDEN_PACKAGES = ("transformers", "peft", "gguf") if os.environ.get("MINIGPT_HIDE_OPTIONAL") == "1" else ()


class HideOptionalPackages(importlib.abc.MetaPathFinder):
    """An import finder that answers "not installed" for HIDDEN_PACKAGES and their submodules."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        if name.partition(".")[0] in HIDDEN_PACKAGES:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by MINIGPT_HIDE_OPTIONAL=1)", name=name)
        return None


if HIDDEN_PACKAGES:
    assert not any(name.partition(".")[0] in HIDDEN_PACKAGES for name in sys.modules), "imported before conftest hid it"
    sys.meta_path.insert(0, HideOptionalPackages())


def require(name: str) -> ModuleType:
    """The optional package `name`; the test is skipped where it is missing, and fails under CI=true."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if name.partition(".")[0] in HIDDEN_PACKAGES:
            pytest.skip(f"{name} is hidden (MINIGPT_HIDE_OPTIONAL=1)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed ({error}); CI installs every optional package (pip install -e '.[test]').")
        pytest.skip(f"needs {name} (pip install -e '.[test]')")


class optional:  # noqa: N801 - reads like the module it stands for
    """A module-level stand-in for an optional package: `transformers = optional("transformers")`
    imports nothing until a test uses it, and then `require`s it, so only the tests that use it skip."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attribute: str):  # noqa: ANN204
        if attribute.startswith("_"):  # what pytest's collection asks of every module-level name
            raise AttributeError(attribute)
        return getattr(require(self.name), attribute)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.requires("gguf")`: for tests that need a package only through MiniGPT's code."""
    for marker in item.iter_markers("requires"):
        for name in marker.args:
            require(name)

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
