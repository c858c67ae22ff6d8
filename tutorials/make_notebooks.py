"""Write one Jupyter notebook per chapter, from the chapter's Markdown: the Markdown is the one source.

    python tutorials/make_notebooks.py          # writes tutorials/notebooks/NN_name.ipynb

Prose becomes Markdown cells and each runnable ```python block a code cell, in order; blocks
fenced `python no-run` and shell commands stay in the prose, as they are only to be read or
typed in a terminal. The notebooks hold no outputs: run them to see them. The test suite checks
that the committed notebooks are exactly what this script writes from today's chapters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TUTORIALS = Path(__file__).resolve().parent
NOTEBOOKS = TUTORIALS / "notebooks"
RUNNABLE = re.compile(r"^```python[ \t]*(?P<options>[^\n]*)\n(?P<code>.*?)^```[ \t]*$\n?", re.MULTILINE | re.DOTALL)


def chapters() -> list[Path]:
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.md"))


def _cell(kind: str, text: str, index: int) -> dict:
    lines = text.strip("\n").splitlines(keepends=True)
    cell = {"cell_type": kind, "id": f"cell-{index}", "metadata": {}, "source": lines}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def notebook_json(markdown: str) -> str:
    """The notebook for one chapter's Markdown, as the JSON text written to disk."""
    markdown = markdown.replace("](figures/", "](../figures/").replace("](zh/", "](../zh/")  # the notebooks live one folder down
    pieces, position = [], 0
    for match in RUNNABLE.finditer(markdown):
        if "no-run" in match["options"]:
            continue
        pieces += [("markdown", markdown[position : match.start()]), ("code", match["code"])]
        position = match.end()
    pieces.append(("markdown", markdown[position:]))
    cells = [_cell(kind, text, index) for index, (kind, text) in enumerate(pieces) if text.strip()]
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
        notebook_path(chapter).write_text(notebook_json(chapter.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"wrote {notebook_path(chapter)}")


if __name__ == "__main__":
    main()
