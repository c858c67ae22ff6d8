"""Write one Jupyter notebook per chapter, from the chapter's Markdown: the Markdown is the one source.

    python tutorials/make_notebooks.py          # writes tutorials/notebooks/NN_name.ipynb

Prose becomes Markdown cells and each runnable ```python block a code cell, in order; blocks
fenced `python no-run` and shell commands stay in the prose, as they are only to be read or
typed in a terminal. The notebooks hold no outputs: run them to see them. The test suite checks
that the committed notebooks are exactly what this script writes from today's chapters.

Two things only a notebook gets, as the Markdown stays a page to read:
- a set-up cell first: where `minigpt` cannot be imported (a fresh Colab or kernel; the `minigpt`
  on PyPI is another project) it clones MiniGPT's git repository and installs the clone (chapters 6,
  10 and 14 run its scripts/), then it moves into a new temporary folder, so the runs, checkpoints and exports a chapter writes land there and not
  beside the notebook (the tests run each chapter in a temporary folder too);
- each exercise in a cell of its own followed by an empty code cell to try it in, before the
  solutions.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TUTORIALS = Path(__file__).resolve().parent
NOTEBOOKS = TUTORIALS / "notebooks"
RUNNABLE = re.compile(r"^```python[ \t]*(?P<options>[^\n]*)\n(?P<code>.*?)^```[ \t]*$\n?", re.MULTILINE | re.DOTALL)
EXERCISES = re.compile(r"^## Exercises\n.*?(?=^## Solutions)", re.MULTILINE | re.DOTALL)
EXERCISE = re.compile(r"^\d+\. .*?(?=^\d+\. |\Z)", re.MULTILINE | re.DOTALL)  # a numbered item, with its indented lines
# What a chapter's imports ask the set-up cell to install beside MiniGPT: an extra of pyproject.toml, or a package.
EXTRAS = {"export": ("transformers", "gguf", "peft"), "serve": ("fastapi", "uvicorn", "minigpt.server")}
PACKAGES = ("openai",)
REPOSITORY = tomllib.loads((TUTORIALS.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"]["Repository"]
SET_UP = """\
# Set-up, for this notebook only: MiniGPT importable, and a fresh working folder for what the chapter writes.
import importlib, os, subprocess, sys, tempfile

try:
    import minigpt.model  # noqa: F401  (installed already, as in a clone or the tests: nothing to do)
except ModuleNotFoundError:  # a fresh Colab or kernel: clone MiniGPT's git repository (PyPI's `minigpt` is another project)
    clone = os.path.expanduser("~/minigpt")
    if not os.path.isdir(clone):
        subprocess.run(["git", "clone", "--depth", "1", os.environ.get("MINIGPT_SOURCE", "{repository}"), clone], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", clone + "{extras}"{packages}], check=True)
    sys.path.insert(0, clone)  # this kernel started before the install: import from the clone (its scripts/ beside it)
    importlib.invalidate_caches()
os.chdir(tempfile.mkdtemp(prefix="minigpt-{chapter}-"))
print("working in", os.getcwd())
"""


def chapters() -> list[Path]:
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.md"))


def _cell(kind: str, text: str, index: int) -> dict:
    lines = text.strip("\n").splitlines(keepends=True)
    cell = {"cell_type": kind, "id": f"cell-{index}", "metadata": {}, "source": lines}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def set_up_cell(chapter: str, code: str) -> str:
    """The first code cell: install MiniGPT (with what the chapter's code imports) if missing, then a temporary folder."""
    def imported(module: str) -> bool:
        return re.search(rf"^\s*(import|from) {re.escape(module)}\b", code, re.MULTILINE) is not None

    extras = [extra for extra, modules in EXTRAS.items() if any(imported(module) for module in modules)]
    packages = "".join(f', "{package}"' for package in PACKAGES if imported(package))
    return SET_UP.format(repository=REPOSITORY, extras=f"[{','.join(extras)}]" if extras else "", packages=packages, chapter=chapter)


def prose_pieces(markdown: str) -> list[tuple[str, str]]:
    """One Markdown piece, with its exercises split one to a cell, each followed by an empty code cell to try it in."""
    exercises = EXERCISES.search(markdown)
    if exercises is None:
        return [("markdown", markdown)]
    items = list(EXERCISE.finditer(exercises[0]))
    pieces = [("markdown", markdown[: exercises.start() + items[0].start()])]
    for item in items:
        pieces += [("markdown", item[0]), ("code", "")]
    return pieces + [("markdown", markdown[exercises.end() :])]


def notebook_json(markdown: str, chapter: str) -> str:
    """The notebook for one chapter's Markdown (`chapter`: its file's stem), as the JSON text written to disk."""
    markdown = markdown.replace("](figures/", "](../figures/").replace("](zh/", "](../zh/")  # the notebooks live one folder down
    blocks = [match for match in RUNNABLE.finditer(markdown) if "no-run" not in match["options"]]
    pieces, position = [("code", set_up_cell(chapter, "".join(match["code"] for match in blocks)))], 0
    for match in blocks:
        pieces += [*prose_pieces(markdown[position : match.start()]), ("code", match["code"])]
        position = match.end()
    pieces += prose_pieces(markdown[position:])
    cells = [_cell(kind, text, index) for index, (kind, text) in enumerate(pieces) if text.strip() or kind == "code"]
    notebook = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def notebook_path(chapter: Path) -> Path:
    return NOTEBOOKS / f"{chapter.stem}.ipynb"


def main() -> None:
    NOTEBOOKS.mkdir(exist_ok=True)
    for chapter in chapters():
        notebook_path(chapter).write_text(notebook_json(chapter.read_text(encoding="utf-8"), chapter.stem), encoding="utf-8")
        print(f"wrote {notebook_path(chapter)}")


if __name__ == "__main__":
    main()
