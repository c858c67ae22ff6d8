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
