"""The built-in corpus: offline, deterministic, a few MB, and free of import side effects."""

import subprocess
import sys
from itertools import islice
from pathlib import Path

from minigpt.corpus import builtin_corpus, builtin_corpus_fingerprint, builtin_documents


def test_corpus_is_megabytes_of_documentation():
    documents = builtin_corpus()
    total = sum(len(document.encode("utf-8")) for document in documents)
    assert len(documents) > 300 and total > 2_500_000
    assert all(document.strip() for document in documents)
    assert any('The "for" statement' in document for document in documents[:100])  # pydoc's help topics come first
    assert any(document.startswith("Module json\n") for document in documents)
    assert any("\ndef json.dumps(obj, *, skipkeys=False" in document for document in documents)


def test_tests_and_third_party_packages_are_left_out():
    headings = {line for document in builtin_corpus() for line in document.splitlines() if line.startswith("Module ")}
    assert "Module json" in headings and "Module email.message" in headings
    for left_out in ("test", "idlelib", "turtledemo", "numpy", "pip", "tokenizers"):
        assert not any(heading.split(".")[0] == f"Module {left_out}" for heading in headings)


def test_corpus_is_deterministic_and_lazy():
    first = list(islice(builtin_documents(), 200))
    assert first == list(islice(builtin_documents(), 200))
    assert tuple(first) == builtin_corpus()[:200]
    fingerprint = builtin_corpus_fingerprint()
    assert len(fingerprint) == 12 and fingerprint == builtin_corpus_fingerprint.__wrapped__()


def test_reading_the_corpus_imports_none_of_the_modules_it_reads():
    # In a fresh process, so that no other test has imported anything first. `ast` itself needs
    # a few modules (inspect, tokenize, ...), but none of the hundreds whose text is read.
    script = (
        "import sys; from minigpt.corpus import builtin_corpus; before = set(sys.modules); builtin_corpus(); "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    repository = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", script], cwd=repository, capture_output=True, text=True, check=True)
    imported = result.stdout.split()
    assert len(imported) < 15
    assert not {"antigravity", "this", "idlelib", "turtle", "tkinter", "webbrowser"} & set(imported)
