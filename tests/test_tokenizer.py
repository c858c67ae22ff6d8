"""Tokenizers: exact round trips, deterministic training, standard files, chat masks."""

import json

import pytest
from tokenizers import Tokenizer as HuggingFaceTokenizer

from minigpt.errors import UserInputError
from minigpt.tokenizer import (
    SPECIAL_TOKENS, load_tokenizer, train_bpe_tokenizer, train_char_tokenizer,
    train_tokenizer,
)

MIXED = [
    "The quick brown fox jumps over the lazy dog.\n\nA second paragraph, with numbers 12345 and symbols #@!.",
    "机器学习是人工智能的一个分支。你好，世界！",
    "Emoji: 👩‍👩‍👧‍👦 🎉🚀 flags 🇫🇷 and skin tones 👍🏽",
    "Combining marks: e\u0301 a\u0308 n\u0303 and precomposed é ä ñ",
    "Control characters \x00 \x01 \x1b[31m and DEL \x7f",
    "Whitespace runs:    four spaces\t\ttwo tabs\r\nwindows line\n\n\n\nblank lines   ",
    "",
    "<|endoftext|> written literally, and <|im_start|>",
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(MIXED * 20, vocab_size=400, show_progress=False)


@pytest.fixture(scope="module")
def char():
    return train_char_tokenizer(MIXED, show_progress=False)


@pytest.mark.parametrize("text", MIXED)
def test_round_trips_are_exact(bpe, char, text):
    assert bpe.decode(bpe.encode(text)) == text
    assert char.decode(char.encode(text)) == text


def test_any_unicode_round_trips_through_bpe_even_unseen(bpe):
    unseen = "Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff"
    assert bpe.decode(bpe.encode(unseen)) == unseen


def test_batch_encoding_matches_single(bpe, char):
    for tokenizer in (bpe, char):
        assert tokenizer.encode_batch(MIXED) == [tokenizer.encode(text) for text in MIXED]


def test_special_tokens_have_fixed_ids(bpe, char):
    for tokenizer in (bpe, char):
        assert [tokenizer.eos_id, tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.pad_id] == [0, 1, 2, 3]
        assert [tokenizer.backend.id_to_token(index) for index in range(4)] == SPECIAL_TOKENS


def test_bpe_training_is_deterministic(tmp_path, bpe):
    again = train_bpe_tokenizer(MIXED * 20, vocab_size=400, show_progress=False)
    bpe.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_saved_file_loads_with_bare_tokenizers_library(tmp_path, bpe, char, kind):
    tokenizer = bpe if kind == "bpe" else char
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    bare = HuggingFaceTokenizer.from_file(str(path))
    for text in MIXED:
        assert bare.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)
    loaded = load_tokenizer(path)
    assert loaded.kind == kind and loaded.vocab_size == tokenizer.vocab_size
    assert [entry.name for entry in tmp_path.iterdir()] == ["tokenizer.json"]


def test_token_byte_lengths_add_up_to_the_text(bpe, char):
    for tokenizer in (bpe, char):
        lengths = tokenizer.token_byte_lengths()
        assert lengths[:4] == [0, 0, 0, 0]
        for text in MIXED[:-1]:  # the last one holds special tokens, which stand for no bytes
            assert sum(lengths[index] for index in tokenizer.encode(text)) == len(text.encode("utf-8"))


def test_vocabulary_size_and_sample_cap_are_honoured():
    consumed = []

    def texts():
        for index in range(1000):
            consumed.append(index)
            yield MIXED[index % len(MIXED)]

    tokenizer = train_bpe_tokenizer(texts(), vocab_size=300, max_samples=50, show_progress=False)
    assert len(consumed) <= 51  # islice may look at one past the cap, never further
    assert tokenizer.vocab_size <= 300


def test_chat_mask_covers_exactly_the_assistant_replies(bpe):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好?"},
        {"role": "assistant", "content": "Hello! 👋"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Hi."},
    ]
    ids, mask = bpe.render_chat(conversation)
    assert len(ids) == len(mask)
    assert bpe.decode(ids) == "".join(f"<|im_start|>{turn['role']}\n{turn['content']}<|im_end|>\n" for turn in conversation)
    learned = [index for index, keep in zip(ids, mask) if keep]
    assert bpe.decode(learned) == "Hello! 👋<|im_end|>Hi.<|im_end|>"
    prompt = bpe.chat_prompt(conversation[:2])
    assert bpe.decode(prompt).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("turn", [{"role": "robot", "content": "x"}, {"role": "user"}, "just text"])
def test_bad_chat_turns_are_explained(bpe, turn):
    with pytest.raises(UserInputError, match="chat turn"):
        bpe.render_chat([turn])


def test_bad_files_and_settings_are_explained(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(UserInputError, match="could not be read"):
        load_tokenizer(corrupt)
    with pytest.raises(UserInputError, match="at least 260"):
        train_bpe_tokenizer(MIXED, vocab_size=100, show_progress=False)
    with pytest.raises(UserInputError, match="Unknown tokenizer type"):
        train_tokenizer("wordpiece", MIXED, 1000)
    foreign = HuggingFaceTokenizer.from_str(json.dumps({
        "version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
        "added_tokens": [], "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "truncation": None, "padding": None,
    }))
    foreign.save(str(tmp_path / "foreign.json"))
    with pytest.raises(UserInputError, match="special tokens"):
        load_tokenizer(tmp_path / "foreign.json")


def test_unseen_characters_map_to_the_unknown_token(char):
    assert char.decode(char.encode("Ω")) == "<|unk|>"
