"""The data pipeline: bounded memory, exact resume, clean shards, and bad lines reported."""

import json
import logging
import tracemalloc

import pytest
import torch

from minigpt.data import TokenBlockStream, iter_documents, resolve_data_files
from minigpt.errors import UserInputError
from minigpt.model import IGNORE_INDEX
from minigpt.tokenizer import train_bpe_tokenizer, train_char_tokenizer

WORDS = "the model reads text and learns to predict the next token from those before it".split()


def write_jsonl(path, count, start=0):
    with open(path, "w", encoding="utf-8") as file:
        for index in range(start, start + count):
            text = f"Document {index}: " + " ".join(WORDS[(index + offset) % len(WORDS)] for offset in range(20 + index % 30))
            file.write(json.dumps({"text": text, "id": index}) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return train_char_tokenizer(["Document 0123456789: " + " ".join(WORDS) + "\n"], show_progress=False)


def batches(stream, count):
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def document_ids(stream_or_texts):
    return {int(text.split(":")[0].split()[1]) for text in stream_or_texts}


def test_batches_are_shifted_pairs(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", 50)
    inputs, targets = next(iter(TokenBlockStream([path], tokenizer, block_size=32, batch_size=4)))
    assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert tokenizer.decode(inputs[0].tolist()).startswith("Document 0: ")
    # Blocks overlap by one token, so every token of the stream is predicted exactly once.
    assert inputs[1, 0] == targets[0, -1]


@pytest.mark.parametrize("shuffle_buffer", [0, 16])
@pytest.mark.parametrize("kind", ["jsonl", "txt"])
def test_resume_from_state_gives_identical_batches(tmp_path, tokenizer, shuffle_buffer, kind):
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "a.jsonl", 40)
    else:
        path = tmp_path / "a.txt"
        path.write_text("\n\n".join(f"Paragraph {index}\n" + " ".join(WORDS[index % 7:]) for index in range(60)) + "\n")

    def make():
        return TokenBlockStream([path], tokenizer, block_size=24, batch_size=3, split="train", val_fraction=0.2,
                                shuffle_buffer=shuffle_buffer, seed=5, tokenize_batch_size=4)

    uninterrupted = batches(make(), 120)  # several epochs of this small file
    first = make()
    head = batches(first, 37)
    state_file = tmp_path / "state.pt"
    torch.save(first.state_dict(), state_file)
    resumed = make()
    resumed.load_state_dict(torch.load(state_file, weights_only=True))
    tail = batches(resumed, 120 - 37)
    for expected, actual in zip(uninterrupted, head + tail):
        assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])
    assert first.epoch == 0 and resumed.epoch >= 1  # the resume crossed an epoch boundary


def test_shards_partition_the_documents(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", 101)
    seen = []
    for rank in range(3):
        stream = TokenBlockStream([path], tokenizer, block_size=1_000_000, batch_size=1, rank=rank, world_size=3, loop=False)
        documents = []
        while chunk := stream._read_documents():
            documents += [document.text for document in chunk]
        seen.append(document_ids(documents))
    assert set().union(*seen) == set(range(101))
    assert sum(len(shard) for shard in seen) == 101  # pairwise disjoint


def test_dataloader_workers_split_the_stream(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", 60)
    stream = TokenBlockStream([path], tokenizer, block_size=16, batch_size=2, loop=False)
    single = sum(batch[0].shape[0] for batch in stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    blocks = sum(batch[0].shape[0] for batch in loader)
    assert abs(blocks - single) <= 2  # each worker may leave a partial block at its end


def test_validation_hold_out_is_disjoint_deterministic_and_repeatable(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", 300)
    texts = list(iter_documents([path]))

    def split_ids(split):
        stream = TokenBlockStream([path], tokenizer, block_size=10_000, batch_size=1, split=split, val_fraction=0.1, loop=False)
        ids = []
        while chunk := stream._read_documents():
            ids += [document.text for document in chunk]
        return document_ids(ids)

    train, val = split_ids("train"), split_ids("val")
    assert not train & val and train | val == document_ids(texts)
    assert 10 <= len(val) <= 60 and split_ids("val") == val
    stream = TokenBlockStream([path], tokenizer, block_size=32, batch_size=2, split="val", val_fraction=0.1, loop=False)
    first, second = list(stream), list(stream)  # a finite stream starts over when iterated again
    assert len(first) > 0 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))


def test_text_pieces_reassemble_the_file(tmp_path):
    path = tmp_path / "book.txt"
    content = "\n\nTitle\n\nFirst paragraph\ncontinues here.\n\n\nSecond, 中文.\n   \nLast line without newline"
    path.write_text(content, encoding="utf-8")
    assert "".join(iter_documents([path])) == content
    assert len(list(iter_documents([path]))) == 4


def test_memory_stays_flat_as_the_file_grows(tmp_path):
    tokenizer = train_bpe_tokenizer([" ".join(WORDS)] * 20, vocab_size=300, show_progress=False)
    peaks = []
    for count in (4_000, 16_000):  # about 1 MB, then 4 MB
        path = write_jsonl(tmp_path / f"{count}.jsonl", count)
        stream = TokenBlockStream([path], tokenizer, block_size=64, batch_size=8, shuffle_buffer=32, loop=False)
        tracemalloc.start()
        blocks = sum(inputs.shape[0] for inputs, _ in stream)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert blocks > 0
    assert path.stat().st_size > 3_000_000
    assert peaks[1] < 1.5 * peaks[0] and peaks[1] < 2_000_000


def test_broken_lines_are_reported_and_skipped(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", 100)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[4] = b"{not json\n"
    lines[9] = b'["a list"]\n'
    lines[14] = b'{"title": "no text field"}\n'
    lines[19] = b'{"text": "bad \xff utf-8"}\n'
    lines[-1] = lines[-1][:25]  # a truncated last line
    path.write_bytes(b"".join(lines))
    with caplog.at_level(logging.WARNING, logger="minigpt.data"):
        texts = list(iter_documents([path]))
    assert len(texts) == 95
    for line, reason in [(5, "not valid JSON"), (10, "not a JSON object"), (15, "no string field 'text'"), (20, "not valid UTF-8"), (100, "not valid JSON")]:
        assert f"a.jsonl:{line}: {reason}" in caplog.text


def test_a_mostly_broken_file_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + "garbage\n" * 30)
    with pytest.raises(UserInputError, match="bad.jsonl has .* bad lines"):
        list(iter_documents([path]))
    all_bad = tmp_path / "all_bad.jsonl"
    all_bad.write_text("garbage\n" * 3)
    with pytest.raises(UserInputError, match="Every line of .*all_bad.jsonl is bad"):
        list(iter_documents([all_bad]))


def test_missing_empty_and_unmatched_sources_are_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserInputError, match="missing.jsonl does not exist"):
        resolve_data_files([str(tmp_path / "missing.jsonl")])
    with pytest.raises(UserInputError, match="empty.jsonl is empty"):
        resolve_data_files([str(tmp_path / "empty.jsonl")])
    with pytest.raises(UserInputError, match="No file matches"):
        resolve_data_files([str(tmp_path / "*.parquet")])
    with pytest.raises(UserInputError, match="neither .jsonl nor .txt"):
        resolve_data_files([str(tmp_path / "data.csv")])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "b.jsonl", 3)
    assert resolve_data_files([str(tmp_path / "sub")]) == [tmp_path / "sub" / "b.jsonl"]


def test_chat_records_mask_everything_but_the_assistant(tmp_path):
    tokenizer = train_bpe_tokenizer(["hello there friend, how are you"] * 10, vocab_size=300, show_progress=False)
    path = tmp_path / "sft.jsonl"
    record = {"conversations": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "there friend"}]}
    path.write_text(json.dumps(record) + "\n")
    ids, mask = tokenizer.render_chat(record["conversations"])
    stream = TokenBlockStream([path], tokenizer, block_size=len(ids), batch_size=1, assistant_only_loss=True, loop=False)
    inputs, targets = next(iter(stream))
    expected = [token if keep else IGNORE_INDEX for token, keep in zip(ids[1:] + [tokenizer.eos_id], mask[1:] + [True])]
    assert targets[0].tolist() == expected
    assert tokenizer.decode([t for t in targets[0].tolist() if t != IGNORE_INDEX]) == "there friend<|im_end|><|endoftext|>"


def test_parallel_batches_resume_exactly_by_replaying(tmp_path, tokenizer):
    from minigpt.data import ParallelBatches

    path = write_jsonl(tmp_path / "a.jsonl", 200)

    def make():
        stream = TokenBlockStream([path], tokenizer, block_size=16, batch_size=2, shuffle_buffer=8, seed=2)
        return ParallelBatches(stream, workers=2)

    uninterrupted = batches(make(), 30)
    first = make()
    batches(first, 12)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == {"consumed_batches": 12}
    for expected, actual in zip(uninterrupted[12:], batches(resumed, 18)):
        assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])
    single_process = batches(TokenBlockStream([path], tokenizer, block_size=16, batch_size=2, shuffle_buffer=8, seed=2), 30)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(single_process, uninterrupted))  # two shards interleave
