"""Every tutorial chapter runs: its Python code blocks are executed in order, as a reader would.

A block fenced as ```python runs; one fenced as ```python no-run is only meant to be read (a
long training command, say) and is skipped. The solutions to the exercises are ordinary blocks
at the end of a chapter, so they run too. Each chapter runs in its own process, in a fresh
temporary directory, so chapters cannot lean on each other's files. Beside the chapters: every
figure a chapter shows exists, and the notebooks are what `tutorials/make_notebooks.py` writes.

Every chapter has a Chinese edition (`tutorials/zh/`, same file names) holding the same code
blocks, character for character, so its code runs when the English chapter's does and the two
cannot drift; each edition links to the other in its first lines.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((REPO / "tutorials").glob("[0-9][0-9]_*.md"))
CHINESE_CHAPTERS = sorted((REPO / "tutorials" / "zh").glob("[0-9][0-9]_*.md"))
BLOCK = re.compile(r"^```python[ \t]*(?P<options>[^\n]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def chapter_code(path: Path) -> str:
    blocks = [match["code"] for match in BLOCK.finditer(path.read_text(encoding="utf-8")) if "no-run" not in match["options"]]
    return "\n".join(blocks)


def test_there_are_chapters_and_each_has_code():
    assert CHAPTERS
    for chapter in CHAPTERS:
        assert chapter_code(chapter).strip(), f"{chapter.name} has no runnable code"


@pytest.mark.slow  # about 4.5 minutes for all chapters on 2 cores: CI runs them in its slow stage, after the suite
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[chapter.stem for chapter in CHAPTERS])
def test_chapter_runs(chapter, tmp_path):
    script = tmp_path / f"{chapter.stem}.py"
    script.write_text(chapter_code(chapter), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{chapter.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


IMAGE = re.compile(r"!\[[^\]]*\]\((?P<path>[^)]+)\)")
FIGURES = REPO / "tutorials" / "figures"
# The PNGs make_figures.py writes: `save(figure, "name")`, or a plot the library drew copied to `HERE / "name.png"`.
# Read from its source, as running it trains models for minutes.
WRITTEN = re.compile(r'\bsave\(\w+, "(?P<save>[\w-]+)"\)|HERE / "(?P<copy>[\w-]+)\.png"')


def figures_shown(chapter: Path) -> list[Path]:
    return [(chapter.parent / match["path"]).resolve() for match in IMAGE.finditer(chapter.read_text(encoding="utf-8"))]


def figures_drawn() -> set[str]:
    source = (FIGURES / "make_figures.py").read_text(encoding="utf-8")
    return {match["save"] or match["copy"] for match in WRITTEN.finditer(source)}


@pytest.mark.parametrize("chapter", CHAPTERS + CHINESE_CHAPTERS, ids=[
    f"{chapter.parent.name}/{chapter.stem}" for chapter in CHAPTERS + CHINESE_CHAPTERS])
def test_chapter_shows_a_figure_that_exists_and_the_figures_script_draws(chapter):
    shown = figures_shown(chapter)
    assert any(path.parent == FIGURES for path in shown), f"{chapter.name} shows no figure of tutorials/figures/"
    drawn = figures_drawn()
    for path in shown:
        assert path.is_file(), f"{chapter.name} shows {path.name}, which is missing"
        assert path.parent == FIGURES and path.suffix == ".png" and path.stem in drawn, (
            f"{chapter.name} shows {path.name}, which tutorials/figures/make_figures.py does not draw")


def test_both_editions_show_the_same_figures_and_every_figure_is_shown():
    for chapter in CHAPTERS:
        chinese = REPO / "tutorials" / "zh" / chapter.name
        assert sorted(figures_shown(chinese)) == sorted(figures_shown(chapter)), f"zh/{chapter.name} shows other figures"
    shown = {path.stem for chapter in CHAPTERS for path in figures_shown(chapter)}
    assert {path.stem for path in FIGURES.glob("*.png")} == shown, "a figure no chapter shows, or one shown but not committed"
    assert figures_drawn() == shown, "make_figures.py draws a figure no chapter shows"


FENCED = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)  # every fenced block, any language


def fenced_blocks(path: Path) -> list[str]:
    return FENCED.findall(path.read_text(encoding="utf-8"))


def opening(path: Path) -> str:
    return "\n".join(path.read_text(encoding="utf-8").splitlines()[:5])


CHAPTER_NAMES = sorted({chapter.name for chapter in CHAPTERS + CHINESE_CHAPTERS})  # either edition's: both must exist


@pytest.mark.parametrize("name", CHAPTER_NAMES, ids=[Path(name).stem for name in CHAPTER_NAMES])
def test_chinese_chapter_has_the_english_code_and_they_link(name):
    english, chinese = REPO / "tutorials" / name, REPO / "tutorials" / "zh" / name
    assert english.is_file(), f"zh/{name} has no English chapter of the same name"
    assert chinese.is_file(), f"{name} has no Chinese edition: write tutorials/zh/{name} (the same code blocks, Chinese prose)"
    ours, theirs = fenced_blocks(chinese), fenced_blocks(english)
    for number, (block, english_block) in enumerate(zip(ours, theirs), start=1):
        assert block == english_block, f"zh/{chinese.name}: code block {number} differs from the English chapter's"
    assert len(ours) == len(theirs), f"zh/{chinese.name} has {len(ours)} code blocks, the English chapter {len(theirs)}"
    assert f"](../{english.name})" in opening(chinese), f"zh/{chinese.name} does not link to the English edition at its top"
    assert f"](zh/{chinese.name})" in opening(english), f"{english.name} does not link to its Chinese edition at its top"


def test_chinese_tutorials_have_an_index_and_a_glossary():
    assert CHINESE_CHAPTERS
    index = (REPO / "tutorials" / "zh" / "README.md").read_text(encoding="utf-8")
    assert all(f"]({chapter.name})" in index for chapter in CHINESE_CHAPTERS), "tutorials/zh/README.md misses a chapter"
    assert (REPO / "tutorials" / "zh" / "术语表.md").is_file()
    assert "](README.zh-CN.md)" in opening(REPO / "README.md") and "](README.md)" in opening(REPO / "README.zh-CN.md")


def _make_notebooks():
    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "tutorials" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_up_to_date_and_hold_no_outputs():
    make_notebooks = _make_notebooks()
    for chapter in CHAPTERS:
        path = make_notebooks.notebook_path(chapter)
        assert path.is_file(), f"{path.name} is missing: run python tutorials/make_notebooks.py"
        committed = path.read_text(encoding="utf-8")
        assert committed == make_notebooks.notebook_json(chapter.read_text(encoding="utf-8"), chapter.stem), (
            f"{path.name} is out of date with {chapter.name}: run python tutorials/make_notebooks.py"
        )
        cells = json.loads(committed)["cells"]
        assert all(cell.get("outputs", []) == [] and cell.get("execution_count") is None for cell in cells)
        set_up, *code_cells = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
        assert set_up == make_notebooks.set_up_cell(chapter.stem, chapter_code(chapter)).strip("\n")
        # The notebook runs exactly what the test runs, after its set-up; the empty cells are the exercises' scratch cells.
        assert "\n".join(code + "\n" for code in code_cells if code).strip() == chapter_code(chapter).strip()
        texts = ["".join(cell["source"]) for cell in cells]
        solutions = next(index for index, text in enumerate(texts) if text.startswith("## Solutions"))
        exercises = [index for index in range(solutions) if re.match(r"\d+\. ", texts[index])]  # one exercise a cell
        assert exercises, f"{path.name} has no exercises before its solutions"
        assert all(cells[index + 1]["cell_type"] == "code" and not texts[index + 1] for index in exercises)  # a cell to try it in


def test_a_notebooks_set_up_cell_installs_nothing_where_minigpt_imports_and_moves_to_a_temporary_folder(tmp_path):
    make_notebooks = _make_notebooks()
    set_up = make_notebooks.set_up_cell("13_export", "import transformers\n")
    assert 'clone + "[export]"' in set_up and make_notebooks.REPOSITORY.startswith("https://") and make_notebooks.REPOSITORY in set_up
    # Cloning this source would fail (check=True), so a clean exit means no install was tried.
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINIGPT_SOURCE": str(tmp_path / "no-such-source"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", set_up], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    working = Path(result.stdout.split("working in ")[-1].strip())
    assert working.is_dir() and working != tmp_path and working.name.startswith("minigpt-13_export-")
    working.rmdir()
