"""The built-in corpus: English text that every Python installation already carries.

So that `scripts/train.py` works on a fresh machine with no download and no data prepared,
MiniGPT's default training text is Python's own documentation:
    1. the help topics of `pydoc_data.topics` (the language reference behind `help("if")`),
    2. for each standard-library module, read from its source file with `ast`: the docstrings
       of the module, its classes and functions, then its longer comment blocks.
The sources are parsed, never imported (importing `antigravity` opens a web browser, and many
modules do work when imported). The order is sorted, so the corpus is the same on every run of
the same Python version.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Iterator

BUILTIN_CORPUS = "builtin"  # the name that stands for this corpus among data sources

# Installed third-party packages and generated files are not the standard library's text.
SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "__pycache__", "pydoc_data"}
MINIMUM_DOCUMENT_CHARACTERS = 200
MINIMUM_COMMENT_LINES = 3  # shorter comment blocks are mostly code notes, not prose


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = set(path.relative_to(root).parts[:-1])
        if not parts & SKIPPED_DIRECTORIES and not any(part.startswith("config-") for part in parts):
            files.append(path)
    return sorted(files)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"{node.name}({ast.unparse(node.args)})"
    except Exception:  # noqa: BLE001 - a strange signature is not worth losing the docstring
        return f"{node.name}(...)"


def _comment_blocks(source: str) -> list[str]:
    """Runs of at least MINIMUM_COMMENT_LINES consecutive comment lines, as paragraphs."""
    blocks, current = [], []
    for line in source.splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            current.append(stripped.lstrip("#").strip())
            continue
        if len(current) >= MINIMUM_COMMENT_LINES:
            blocks.append("\n".join(current).strip())
        current = []
    return [block for block in blocks if block]


def _module_document(path: Path, module_name: str) -> str | None:
    """A module's documentation as one text: its docstring, each class's and function's, its comments."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():  # old escapes in some modules' strings are not our concern
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    sections = []
    module_docstring = ast.get_docstring(tree)
    if module_docstring:
        sections.append(f"Module {module_name}\n\n{module_docstring}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                docstring = ast.get_docstring(node)
                if docstring:
                    sections.append(f"class {prefix}{node.name}\n\n{docstring}")
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    sections.append(f"def {prefix}{_signature(node)}\n\n{docstring}")
                visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, f"{module_name}.")
    comments = _comment_blocks(source)
    if comments:
        sections.append(f"Notes from the source of {module_name}\n\n" + "\n\n".join(comments))
    text = "\n\n".join(sections)
    return text if len(text) >= MINIMUM_DOCUMENT_CHARACTERS else None


@lru_cache(maxsize=1)
def builtin_corpus() -> tuple[str, ...]:
    """Every document of the corpus, in order (about 4 MB of English in all)."""
    # Parsing the whole standard library takes seconds; the result (a few MB) is kept, since
    # training reads the corpus once per epoch and evaluation reads its hold-out repeatedly.
    from pydoc_data.topics import topics

    documents = [topics[key].strip() + "\n" for key in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        relative = path.relative_to(root).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        document = _module_document(path, ".".join(parts))
        if document:
            documents.append(document + "\n")
    return tuple(documents)


def builtin_documents() -> Iterator[str]:
    """The corpus's documents one by one."""
    return iter(builtin_corpus())


@lru_cache(maxsize=1)
def builtin_corpus_fingerprint() -> str:
    """A short key for this corpus's version: the Python version and the list of its source files."""
    listing = "\n".join(f"{path}:{path.stat().st_size}" for path in _stdlib_files())
    return hashlib.sha256(f"{sys.version}\n{listing}".encode()).hexdigest()[:12]
