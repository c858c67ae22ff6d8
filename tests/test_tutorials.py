"""Every tutorial chapter runs: its Python code blocks are executed in order, as a reader would.

A block fenced as ```python runs; one fenced as ```python no-run is only meant to be read (a
long training command, say) and is skipped. Each chapter runs in its own process, in a fresh
temporary directory, so chapters cannot lean on each other's files.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((REPO / "tutorials").glob("[0-9][0-9]_*.md"))
BLOCK = re.compile(r"^```python[ \t]*(?P<options>[^\n]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def chapter_code(path: Path) -> str:
    blocks = [match["code"] for match in BLOCK.finditer(path.read_text(encoding="utf-8")) if "no-run" not in match["options"]]
    return "\n".join(blocks)


def test_there_are_chapters_and_each_has_code():
    assert CHAPTERS
    for chapter in CHAPTERS:
        assert chapter_code(chapter).strip(), f"{chapter.name} has no runnable code"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[chapter.stem for chapter in CHAPTERS])
def test_chapter_runs(chapter, tmp_path):
    script = tmp_path / f"{chapter.stem}.py"
    script.write_text(chapter_code(chapter), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{chapter.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
