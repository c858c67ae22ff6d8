"""The token cache gives exactly the batches of tokenizing on the fly, and is rebuilt when inputs change."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import run_script
from minigpt.data import TokenBlockStream
from minigpt.sources import TokenCache
from minigpt.token_cache import build_token_cache


def stream(sources, tokenizer, **options):
    return TokenBlockStream(sources, tokenizer, block_size=32, batch_size=4, split="train", val_fraction=0.1,
                            shuffle_buffer=16, seed=3, **options)


def take(batches, count):
    iterator = iter(batches)
    return [next(iterator) for _ in range(count)]


def test_cached_stream_equals_the_on_the_fly_stream(tmp_path, corpus_jsonl, tokenizer_file):
    from minigpt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_file)
    cache = build_token_cache([corpus_jsonl], tokenizer, tmp_path / "cache", show_progress=False)
    lines = corpus_jsonl.read_text().splitlines()
    assert cache.documents == len(lines) and cache.tokens.dtype == np.uint16
    first_text = json.loads(lines[0])["text"]
    assert cache.document(0).tokens.tolist() == tokenizer.encode(first_text) + [tokenizer.eos_id]
    on_the_fly, cached = take(stream([corpus_jsonl], tokenizer), 30), take(stream([cache], tokenizer), 30)
    for expected, actual in zip(on_the_fly, cached):
        assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])
    # resuming inside the cache continues exactly too
    source = stream([cache], tokenizer)
    take(source, 11)
    resumed = stream([TokenCache.open(cache.directory)], tokenizer)
    resumed.load_state_dict(source.state_dict())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(take(source, 10), take(resumed, 10)))


def test_a_cached_chat_file_keeps_its_assistant_mask(tmp_path, tokenizer_file):
    """Chat data trained from the cache counts only the assistant's words, as it does read directly."""
    from minigpt.loss import IGNORE_INDEX
    from minigpt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_file)
    chat = tmp_path / "chat.jsonl"
    with open(chat, "w", encoding="utf-8") as file:
        for number in range(200):
            turns = [{"role": "user", "content": f"What is {number} plus one?"},
                     {"role": "assistant", "content": f"It is {number + 1}."}]
            file.write(json.dumps({"conversations": turns}) + "\n")
    cache = build_token_cache([chat], tokenizer, tmp_path / "cache", show_progress=False)
    assert cache.assistant_mask is not None
    direct = take(stream([chat], tokenizer, assistant_only_loss=True), 10)
    cached = take(stream([cache], tokenizer, assistant_only_loss=True), 10)
    for expected, actual in zip(direct, cached):
        assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])
    counted = sum(int((targets != IGNORE_INDEX).sum()) for _, targets in cached)
    assert 0 < counted < sum(targets.numel() for _, targets in cached) / 2  # the user's turns are left out


def test_the_cache_is_reused_until_a_file_changes(tmp_path, corpus_jsonl, tokenizer_file):
    from minigpt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_file)
    data = tmp_path / "data.jsonl"
    data.write_text(corpus_jsonl.read_text())
    first = build_token_cache([data], tokenizer, tmp_path / "cache", show_progress=False)
    assert build_token_cache([data], tokenizer, tmp_path / "cache", show_progress=False).directory == first.directory
    data.write_text(data.read_text() + json.dumps({"text": "one more document"}) + "\n")
    os.utime(data, ns=(1, 1))  # a different modification time, as an edit would give
    second = build_token_cache([data], tokenizer, tmp_path / "cache", show_progress=False)
    assert second.directory != first.directory and second.documents == first.documents + 1
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == sorted([first.directory.name, second.directory.name])


def test_prepare_data_then_train_from_the_cache(tmp_path, corpus_jsonl, tokenizer_file):
    prepared = run_script("prepare_data.py", "--tokenizer", str(tokenizer_file), "--data-files", str(corpus_jsonl),
                          "--output-dir", "runs", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert "tokens (uint16); built in" in prepared.stdout
    again = run_script("prepare_data.py", "--tokenizer", str(tokenizer_file), "--data-files", str(corpus_jsonl),
                       "--output-dir", "runs", cwd=tmp_path)
    assert "already built" in again.stdout
    trained = run_script("train.py", "--config", "tiny", "--token-cache", "--tokenizer", str(tokenizer_file), "--data-files",
                         str(corpus_jsonl), "--val-fraction", "0.1", "--output-dir", "runs", "--max-steps", "10",
                         "--sample-tokens", "0", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert len(list((tmp_path / "runs" / "token_cache").iterdir())) == 1  # the prepared cache was used, not rebuilt
    broken = run_script("prepare_data.py", "--tokenizer", "missing.json", cwd=tmp_path)
    assert broken.returncode == 2 and "missing.json" in broken.stderr


def test_an_unreadable_cache_is_explained(tmp_path):
    (tmp_path / "index.json").write_text("{}")
    with pytest.raises(Exception, match="delete it to have it rebuilt"):
        TokenCache.open(tmp_path)


def test_a_long_document_is_cached_a_run_at_a_time_to_the_same_tokens(tmp_path, monkeypatch):
    """Building a cache (`minigpt prepare-data`, `--token-cache`) tokenized a long document whole
    and held all its ids (8 bytes a token, then a uint16 copy): a 200 MB line would have cost
    gigabytes (issue #33). Its runs are written as they come: the memory it takes stays about the
    text's own, and the cached tokens are the whole text's. Sizes shrunk: runs of 4 pieces of 500
    characters."""
    import tracemalloc

    import minigpt.sources
    from minigpt.tokenizer import train_char_tokenizer

    words = "the model reads text and learns to predict the next token from those before it".split()
    tokenizer = train_char_tokenizer(["Document 0123456789: " + " ".join(words) + "\n"], show_progress=False)
    long_text = " ".join(words[number % len(words)] for number in range(100_000))  # about 500,000 characters
    texts = ["Document 0: before it", long_text, "Document 2: after it"]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    monkeypatch.setattr(minigpt.sources, "LONG_TEXT_CHARACTERS", 500)
    monkeypatch.setattr(minigpt.sources, "PIECES_PER_CALL", 4)
    tracemalloc.start()
    cache = build_token_cache([path], tokenizer, tmp_path / "cache", show_progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert cache.documents == 3
    for number, text in enumerate(texts):
        assert cache.document(number).tokens.tolist() == tokenizer.encode(text) + [tokenizer.eos_id]
    assert peak < 4 * len(long_text), (peak, len(long_text))  # the ids alone: 8 bytes a character
