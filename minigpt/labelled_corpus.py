"""The built-in labelled set: which part of the standard library a documentation text is about.

So that `minigpt train-classifier` works with no data and no download, it learns a real task
from text every Python installation carries: given a docstring of the standard library (a
module's, a class's or a function's, read with `ast` by `minigpt.corpus`, never imported), say
which of five groups of modules it documents:

    text        re, string, textwrap, difflib, html, xml, codecs, unicodedata, ...
    files       os, pathlib, shutil, glob, tempfile, io, zipfile, tarfile, gzip, ...
    network     socket, ssl, http, urllib, email, smtplib, ftplib, ipaddress, ...
    concurrency threading, multiprocessing, asyncio, concurrent, subprocess, queue, ...
    data        json, csv, pickle, datetime, decimal, fractions, statistics, collections, ...

Only the docstring is the text: the heading naming the module or function is left out, or the
task would be reading a name. Short docstrings are dropped, duplicates kept once, and each group
capped so that none drowns the others (the groups stay unequal: macro-F1 matters). The split
is fixed: a text goes to validation when the stable hash of its content falls below
VALIDATION_FRACTION, the same on every run and machine.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path

from minigpt.corpus import builtin_corpus_fingerprint, parse_module, stdlib_modules
from minigpt.files import atomic_write_bytes
from minigpt.sources import Document, document_hash_fraction

LABELLED_VERSION = 1  # bump when the groups or the extraction change
GROUPS: dict[str, tuple[str, ...]] = {
    "text": ("re", "string", "textwrap", "difflib", "html", "xml", "codecs", "encodings", "unicodedata", "gettext",
             "locale", "stringprep", "shlex", "tokenize"),
    "files": ("os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "io", "_pyio", "zipfile", "tarfile", "gzip", "bz2",
              "lzma", "filecmp", "fileinput", "stat", "ntpath", "posixpath", "genericpath", "mailbox", "zipimport"),
    "network": ("socket", "ssl", "http", "urllib", "email", "smtplib", "ftplib", "imaplib", "poplib", "ipaddress",
                "socketserver", "xmlrpc", "wsgiref", "nntplib", "telnetlib", "mimetypes"),
    "concurrency": ("threading", "multiprocessing", "asyncio", "concurrent", "subprocess", "queue", "sched", "selectors",
                    "signal", "_threading_local"),
    "data": ("json", "csv", "pickle", "pickletools", "copyreg", "datetime", "_pydatetime", "calendar", "_pydecimal",
             "fractions", "statistics", "random", "numbers", "collections", "heapq", "bisect", "enum", "dataclasses",
             "plistlib", "configparser", "struct"),
}
MINIMUM_CHARACTERS = 120
MAXIMUM_PER_GROUP = 700
VALIDATION_FRACTION = 0.2


def group_of(module_name: str) -> str | None:
    """The group of a dotted module name ("email.mime.text" -> "network"), or None."""
    top = module_name.split(".")[0]
    return next((group for group, modules in GROUPS.items() if top in modules), None)


def _docstrings(tree: ast.Module) -> list[str]:
    """Every docstring of a module: its own, and each class's and function's, at any depth."""
    nodes = [tree] + [node for node in ast.walk(tree) if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [text for node in nodes if (text := ast.get_docstring(node))]


@lru_cache(maxsize=1)
def builtin_labelled_records() -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    """(train, validation) records {"text": ..., "labels": group}, in a fixed order."""
    by_group: dict[str, list[str]] = {group: [] for group in GROUPS}
    seen: set[str] = set()
    for module_name, path in stdlib_modules():
        group = group_of(module_name)
        parsed = parse_module(path) if group else None
        if parsed is None:
            continue
        for text in _docstrings(parsed[1]):
            if len(text) >= MINIMUM_CHARACTERS and text not in seen:
                seen.add(text)
                by_group[group].append(text)
    train, validation = [], []
    for group, texts in by_group.items():
        # A stable, content-based choice of which texts a capped group keeps.
        kept = sorted(texts, key=lambda text: hashlib.blake2b(text.encode(), digest_size=8).digest())[:MAXIMUM_PER_GROUP]
        for text in kept:
            side = validation if document_hash_fraction(Document(text=text)) < VALIDATION_FRACTION else train
            side.append({"text": text, "labels": group})
    return tuple(train), tuple(validation)


def builtin_labelled_files(directory: str | Path) -> tuple[Path, Path]:
    """The built-in labelled set as train.jsonl and val.jsonl under `directory` (written once per
    Python installation and version of this set, then reused)."""
    home = Path(directory) / f"builtin-labelled-{LABELLED_VERSION}-{builtin_corpus_fingerprint()}"
    paths = home / "train.jsonl", home / "val.jsonl"
    if not all(path.is_file() for path in paths):
        for path, records in zip(paths, builtin_labelled_records()):
            atomic_write_bytes(path, "".join(json.dumps(record) + "\n" for record in records).encode("utf-8"))
    return paths
