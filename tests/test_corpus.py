"""The built-in corpus: offline, deterministic, several MB, and free of import side effects."""

import sys

from minigpt.corpus import builtin_corpus, builtin_corpus_fingerprint, builtin_documents


def test_corpus_is_several_megabytes_of_documents():
    documents = builtin_corpus()
    total = sum(len(document.encode("utf-8")) for document in documents)
    assert len(documents) > 500 and total > 3_000_000
    assert all(document.strip() for document in documents)
    assert any("for_stmt" in document or "The \"for\" statement" in document for document in documents[:200])


def test_corpus_is_deterministic_and_imports_nothing():
    assert list(builtin_documents()) == list(builtin_corpus())
    assert len(builtin_corpus_fingerprint()) == 12
    for side_effect_module in ("antigravity", "this", "idlelib.idle", "turtledemo.__main__"):
        assert side_effect_module not in sys.modules
