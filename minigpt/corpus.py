"""The built-in corpus: English text that every Python installation already carries.

So that `scripts/train.py` works on a fresh machine with no download and no data prepared,
MiniGPT's default training text is Python's own documentation:
    1. the help topics of `pydoc_data.topics` (the language reference behind `help("if")`),
    2. for each standard-library module, read from its source file with `ast`: the docstrings
       of the module, its classes and functions, then its longer comment blocks.
The sources are parsed, never imported (importing `antigravity` opens a web browser, and many
modules do work when imported). Test suites, IDLE and demos are left out: their text is about
the code around it, not documentation. The order is sorted, so the corpus is the same on every
run of the same Python version (about 3 MB of text on Python 3.11).
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Iterator

BUILTIN_CORPUS = "builtin"  # the name that stands for this corpus among data sources
CORPUS_VERSION = 2  # bump when the extraction below changes, so cached tokenizers are rebuilt

# Installed packages, tests, the IDLE editor, demos and build files are not the library's documentation.
SKIPPED_DIRECTORIES = {
    "site-packages", "dist-packages", "__pycache__", "pydoc_data", "lib-dynload", "ensurepip",
    "test", "tests", "idle_test", "idlelib", "turtledemo",
}
MINIMUM_DOCUMENT_CHARACTERS = 200
MINIMUM_COMMENT_LINES = 3  # shorter comment blocks are mostly code notes, not prose


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    """The standard library's own .py files, sorted (skipped directories are never walked into)."""
    files = []
    for directory, subdirectories, names in os.walk(_stdlib_root()):
        # Pruning in place tells os.walk not to descend: site-packages alone can hold 10,000 files.
        subdirectories[:] = [
            name for name in subdirectories if name not in SKIPPED_DIRECTORIES and not name.startswith("config-")
        ]
        files += [Path(directory) / name for name in names if name.endswith(".py")]
    return sorted(files)


def signature_text(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """`name(arguments)` as the source writes it, e.g. `dumps(obj, *, skipkeys=False)`."""
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


def stdlib_modules() -> list[tuple[str, Path]]:
    """(dotted module name, source file) of every standard-library module the corpus reads, sorted."""
    root = _stdlib_root()
    modules = []
    for path in _stdlib_files():
        relative = path.relative_to(root).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        modules.append((".".join(parts), path))
    return modules


def parse_module(path: Path) -> tuple[str, ast.Module] | None:
    """A module's source and its syntax tree, parsed without importing it (None if unreadable)."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():  # old escapes in some modules' strings are not our concern
            warnings.simplefilter("ignore")
            return source, ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


def module_document(path: Path, module_name: str) -> str | None:
    """A module's documentation as one text: its docstring, each class's and function's, its comments."""
    parsed = parse_module(path)
    if parsed is None:
        return None
    source, tree = parsed
    sections = []
    module_docstring = ast.get_docstring(tree)
    if module_docstring:
        sections.append(f"Module {module_name}\n\n{module_docstring}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        # A heading line before each docstring ("class email.message.Message", "def name(args)")
        # makes the text read like reference documentation.
        for node in body:
            if isinstance(node, ast.ClassDef):
                docstring = ast.get_docstring(node)
                if docstring:
                    sections.append(f"class {prefix}{node.name}\n\n{docstring}")
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    sections.append(f"def {prefix}{signature_text(node)}\n\n{docstring}")
                visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, f"{module_name}.")
    comments = _comment_blocks(source)
    if comments:
        sections.append(f"Notes from the source of {module_name}\n\n" + "\n\n".join(comments))
    text = "\n\n".join(sections)
    return text if len(text) >= MINIMUM_DOCUMENT_CHARACTERS else None


def builtin_documents() -> Iterator[str]:
    """The corpus's documents one by one, read lazily: the first ones come at once.

    A full pass parses the whole standard library: about 1.2 s on one core.
    """
    from pydoc_data.topics import topics  # a plain dict of strings: importing it does nothing else

    for key in sorted(topics):
        yield topics[key].strip() + "\n"
    for module_name, path in stdlib_modules():
        document = module_document(path, module_name)
        if document:
            yield document + "\n"


@lru_cache(maxsize=1)
def builtin_corpus() -> tuple[str, ...]:
    """Every document of the corpus, kept in memory after the first call (a few MB).

    For readers that come back to it (an epoch of training, a validation hold-out) or need a
    document by its index; a single pass should use builtin_documents().
    """
    return tuple(builtin_documents())


@lru_cache(maxsize=1)
def builtin_corpus_fingerprint() -> str:
    """A short key for this corpus's content: the extraction version, Python's, and its source files.

    Listing the files and their sizes takes milliseconds, where hashing the text itself would
    need a full pass.
    """
    root = _stdlib_root()
    topics_file = root / "pydoc_data" / "topics.py"
    listing = "\n".join(f"{path.relative_to(root)}:{path.stat().st_size}" for path in [topics_file, *_stdlib_files()])
    return hashlib.sha256(f"{CORPUS_VERSION}\n{sys.version}\n{listing}".encode()).hexdigest()[:12]
