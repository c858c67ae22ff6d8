"""The data pipeline: bounded memory, exact resume, clean shards, and bad lines reported."""

import json
import logging
import subprocess
import sys
import tracemalloc
from types import SimpleNamespace

import pytest
import torch

from minigpt.data import ParallelBatches, TokenBlockStream
from minigpt.sources import MAX_TEXT_PIECE_BYTES, DataReport, DocumentReader, iter_documents, resolve_data_files
from minigpt.errors import UserInputError
from minigpt.loss import IGNORE_INDEX
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


def save(state, directory):
    """Write a state with torch.save, as a checkpoint does; return the file."""
    torch.save(state, directory / "state.pt")
    return directory / "state.pt"


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
    resumed = make()
    resumed.load_state_dict(torch.load(save(first.state_dict(), tmp_path), weights_only=True))
    tail = batches(resumed, 120 - 37)
    for expected, actual in zip(uninterrupted, head + tail):
        assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])
    assert first.epoch.passes == 0 and resumed.epoch.passes >= 1  # the resume crossed an epoch boundary


def test_a_packed_stream_resumes_exactly(tmp_path, tokenizer):
    """Whole documents packed in rows: the documents waiting for a row, their positions and the
    shuffle buffer's rows are all in the saved position."""
    path = write_jsonl(tmp_path / "a.jsonl", 40)

    def make():
        return TokenBlockStream([path], tokenizer, block_size=400, batch_size=3, split="train", val_fraction=0.2,
                                shuffle_buffer=8, seed=5, tokenize_batch_size=4, pack_documents=True)

    uninterrupted = batches(make(), 40)  # several epochs
    first = make()
    head = batches(first, 13)
    resumed = make()
    resumed.load_state_dict(torch.load(save(first.state_dict(), tmp_path), weights_only=True))
    for expected, actual in zip(uninterrupted, head + batches(resumed, 27)):
        assert len(expected) == len(actual) == 3 and all(torch.equal(mine, theirs) for mine, theirs in zip(expected, actual))
    assert len(first.pending_positions) and (first.pending_positions == 0).sum() >= 1  # it stopped with documents waiting


def test_a_position_saved_before_the_epoch_record_still_resumes(tmp_path, tokenizer):
    """Checkpoints from before EpochState held the pass number alone and accepted_documents beside it."""

    def make():
        return TokenBlockStream([write_jsonl(tmp_path / "a.jsonl", 40)], tokenizer, block_size=24, batch_size=3, shuffle_buffer=16, seed=5)

    first = make()
    while first.epoch.passes == 0 or first.epoch.position == 0:  # into the second pass
        next(iter(first))
    state = first.state_dict()
    assert state["epoch"]["passes"] == 1 and state["epoch"]["position"] > 0
    old = {**state, "epoch": state["epoch"]["passes"], "accepted_documents": state["epoch"]["position"]}
    resumed_new, resumed_old = make(), make()
    resumed_new.load_state_dict(state)
    resumed_old.load_state_dict(old)
    assert resumed_old.epoch == resumed_new.epoch
    for expected, actual in zip(batches(resumed_new, 20), batches(resumed_old, 20)):
        assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])


def test_sequences_per_pass_counts_every_shards_rows_and_leaves_the_stream_alone(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", 30)
    whole = sum(len(inputs) for inputs, _ in TokenBlockStream([path], tokenizer, block_size=24, batch_size=5, loop=False))
    shard = TokenBlockStream([path], tokenizer, block_size=24, batch_size=5, rank=1, world_size=2, shuffle_buffer=8, seed=1)
    before = batches(shard, 2)
    assert shard.sequences_per_pass() == whole
    after = TokenBlockStream([path], tokenizer, block_size=24, batch_size=5, rank=1, world_size=2, shuffle_buffer=8, seed=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(before + batches(shard, 2), batches(after, 4)))


def test_worker_shards_partition_the_documents(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", 101)
    seen = []
    for worker in range(3):
        # What torch.utils.data.get_worker_info() says inside DataLoader worker `worker` of 3.
        monkeypatch.setattr("minigpt.data.get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=3))
        stream = iter(TokenBlockStream([path], tokenizer, block_size=1_000_000, batch_size=1, loop=False))
        documents = []
        while chunk := stream._read_documents():
            documents += [document.text for document in chunk]
        seen.append(document_ids(documents))
    assert set().union(*seen) == set(range(101))
    assert sum(len(shard) for shard in seen) == 101  # pairwise disjoint
    assert all(33 <= len(shard) <= 34 for shard in seen)  # and even


@pytest.mark.parametrize("layout", [{"block_size": 24}, {"block_size": 24, "one_document_per_row": True},
                                    {"block_size": 600, "pack_documents": True}],  # rows of 2 to 4 documents
                         ids=["running", "one per row", "packed"])
def test_each_process_takes_its_batch_of_every_round_of_one_process_batches(tmp_path, tokenizer, layout):
    """Under torchrun, process r of n keeps batches r, r + n, r + 2n, ... of what one process reads
    (documents run on into each other and shuffled, one document per row, or whole documents
    packed with their positions): n processes with one micro-batch each train on the rows one
    process trains on in n micro-batches."""
    path = write_jsonl(tmp_path / "a.jsonl", 40)
    options = dict(batch_size=2, shuffle_buffer=8, seed=3, **layout)
    single = batches(TokenBlockStream([path], tokenizer, **options), 12)
    for rank in range(3):
        own = batches(TokenBlockStream([path], tokenizer, rank=rank, world_size=3, **options), 4)
        for expected, actual in zip(single[rank::3], own):
            assert len(expected) == len(actual) == (3 if layout.get("pack_documents") else 2)
            assert all(torch.equal(mine, theirs) for mine, theirs in zip(expected, actual))


def test_dataloader_workers_split_the_stream(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", 60)
    stream = TokenBlockStream([path], tokenizer, block_size=16, batch_size=2, loop=False)
    single = sum(batch[0].shape[0] for batch in stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    blocks = sum(batch[0].shape[0] for batch in loader)
    assert abs(blocks - single) <= 2  # each worker may leave a partial block at its end


def test_a_position_is_refused_by_a_stream_read_with_another_number_of_workers(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", 60)

    def stream():
        return TokenBlockStream([path], tokenizer, block_size=16, batch_size=2)

    main_process, two_workers, three_workers = stream(), ParallelBatches(stream(), 2), ParallelBatches(stream(), 3)
    with pytest.raises(UserInputError, match=r"saved with 2 data-loader worker\(s\) and this run has 0: resume with --dataloader-workers 2"):
        main_process.load_state_dict(two_workers.state_dict())
    with pytest.raises(UserInputError, match=r"saved with 0 data-loader worker\(s\) and this run has 2"):
        two_workers.load_state_dict(main_process.state_dict())
    with pytest.raises(UserInputError, match=r"saved with 3 data-loader worker\(s\) and this run has 2"):
        two_workers.load_state_dict(three_workers.state_dict())
    two_workers.load_state_dict({"consumed_batches": 5})  # saved before the count was recorded: trusted
    assert two_workers.state_dict() == {"consumed_batches": 5, "workers": 2}


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


def test_a_text_file_without_line_breaks_is_cut_into_bounded_pieces(tmp_path, tokenizer):
    path = tmp_path / "one_line.txt"
    content = "Document 7: 中文 and text " * 20_000  # 560 KB on one line; 3-byte characters straddle the cuts
    path.write_text(content, encoding="utf-8")
    pieces = list(iter_documents([path]))
    assert "".join(pieces) == content and len(pieces) >= 9
    assert all(len(piece.encode("utf-8")) <= MAX_TEXT_PIECE_BYTES for piece in pieces)
    long_lines = tmp_path / "long_lines.txt"
    long_lines.write_text("A line of eighty characters, give or take, with no blank line between any two.\n" * 10_000)
    pieces = list(iter_documents([long_lines]))  # a paragraph of 800 KB ends at line boundaries past 64 KB
    assert "".join(pieces) == long_lines.read_text() and all(piece.endswith("\n") for piece in pieces) and len(pieces) == 13
    # The whole file is one document: a single end-of-text token, after its last piece.
    stream = TokenBlockStream([path], train_char_tokenizer([content], show_progress=False), block_size=1000, batch_size=64, loop=False)
    tokens = torch.cat([torch.cat([inputs[:, :1], targets], dim=1).flatten() for inputs, targets in stream])
    assert (tokens == tokenizer.eos_id).sum() == 1


@pytest.mark.slow  # a huge-file test: streams 1 MB then 4 MB and compares the peaks
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
    lines[24] = b'{"text": "a lone surrogate \\ud800 escape"}\n'
    lines[29] = json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    report = DataReport()
    with caplog.at_level(logging.WARNING, logger="minigpt.data"):
        texts = list(iter_documents([path], report=report))
    assert len(texts) == report.documents == 93 and report.bad_lines == 7
    expected = [(5, "not valid JSON"), (10, "not a JSON object"), (15, "no string field 'text'"), (20, "not valid UTF-8"),
                (25, "field 'text' holds a lone surrogate"), (30, "turn 2 of 'conversations'"), (100, "not valid JSON")]
    for line, reason in expected:
        assert f"a.jsonl:{line}: {reason}" in caplog.text
    assert [example.split(": ")[0].rsplit(":", 1)[1] for example in report.examples] == [str(line) for line, _ in expected]


def test_a_resume_just_before_a_broken_last_line_goes_on(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", 30)
    path.write_bytes(path.read_bytes() + b'{"text": "cut off')
    reader = DocumentReader([path], "text")
    for _ in range(30):
        reader.next_document()
    resumed = DocumentReader([path], "text")
    resumed.seek(torch.load(save(reader.position(), tmp_path), weights_only=True))
    assert resumed.next_document() is None  # one bad line of 31, not "every line of the file is bad"


def test_a_mostly_broken_file_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + "garbage\n" * 30)
    with pytest.raises(UserInputError, match="bad.jsonl has .* bad lines"):
        list(iter_documents([path]))
    all_bad = tmp_path / "all_bad.jsonl"
    all_bad.write_text("garbage\n" * 3)
    with pytest.raises(UserInputError, match="Every line of .*all_bad.jsonl is bad"):
        list(iter_documents([all_bad]))


def test_a_validation_stream_reports_bad_lines_once_and_can_be_read_again(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", 300)
    path.write_bytes(path.read_bytes() + b"{not json\n")
    stream = TokenBlockStream([path], tokenizer, block_size=32, batch_size=4, split="val", val_fraction=0.2, loop=False)
    with caplog.at_level(logging.WARNING, logger="minigpt.data"):
        stream.check_not_empty()  # reads only a little, and says nothing
        assert "a.jsonl:301" not in caplog.text
        passes = [[inputs for inputs, _ in stream] for _ in range(3)]
    assert caplog.text.count("a.jsonl:301: not valid JSON") == 1
    assert all(len(batches) == len(passes[0]) > 0 and all(map(torch.equal, batches, passes[0])) for batches in passes)


def test_a_stream_that_cannot_fill_a_block_says_so(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", 20)
    too_big = TokenBlockStream([path], tokenizer, block_size=100_000, batch_size=1, loop=False)
    with pytest.raises(UserInputError, match="No data: .*a.jsonl does not fill one block of 100001 tokens"):
        too_big.check_not_empty()
    with pytest.raises(UserInputError, match="No data"):  # the same, when first read
        next(iter(too_big))
    hold_out = TokenBlockStream([path], tokenizer, block_size=32, batch_size=1, split="val", val_fraction=0.001, loop=False)
    with pytest.raises(UserInputError, match="No validation data.*raise --val-fraction or pass --val-data-files"):
        hold_out.check_not_empty()
    nothing_left = TokenBlockStream([path], tokenizer, block_size=32, batch_size=1, split="train", val_fraction=0.999)
    with pytest.raises(UserInputError, match="No training data.*lower --val-fraction"):
        next(iter(nothing_left))  # a looping stream too: an epoch with no documents would repeat forever


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
    path = write_jsonl(tmp_path / "a.jsonl", 200)

    def make():
        stream = TokenBlockStream([path], tokenizer, block_size=16, batch_size=2, shuffle_buffer=8, seed=2)
        return ParallelBatches(stream, workers=2)

    uninterrupted = batches(make(), 30)
    first = make()
    batches(first, 12)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == {"consumed_batches": 12, "workers": 2}
    for expected, actual in zip(uninterrupted[12:], batches(resumed, 18)):
        assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])
    single_process = batches(TokenBlockStream([path], tokenizer, block_size=16, batch_size=2, shuffle_buffer=8, seed=2), 30)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(single_process, uninterrupted))  # two shards interleave


def test_a_long_document_is_tokenized_in_bounded_pieces_to_the_same_tokens(tmp_path, tokenizer, monkeypatch):
    """One JSONL record of one huge line (issue #33: 30 MB of one line took 3.8 GB, tokenized in one
    call). It is tokenized in pieces cut before a space between two words, where the tokenizer splits
    anyway: the tokens are the whole text's, and no call sees more than the bound. Here the bound is
    shrunk to 2,000 characters; the slow stage trains on a 200 MB line."""
    import minigpt.sources

    monkeypatch.setattr(minigpt.sources, "LONG_TEXT_CHARACTERS", 2_000, raising=False)
    text = " ".join(f"{WORDS[number % len(WORDS)]}{'  ' if number % 97 == 0 else ''}" for number in range(6_000))
    text += " " + "x" * 5_000 + " the end"  # a stretch with no space at all is cut at the bound
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    longest = []
    encode_batch = type(tokenizer).encode_batch

    def watched(self, texts):
        longest.append(max(map(len, texts)))
        return encode_batch(self, texts)

    monkeypatch.setattr(type(tokenizer), "encode_batch", watched)
    stream = TokenBlockStream([path], tokenizer, block_size=64, batch_size=8, loop=False)
    batches = list(stream)
    tokens = torch.cat([batches[0][0][0, :1]] + [targets.flatten() for _, targets in batches])  # blocks overlap by one token
    expected = tokenizer.encode(text) + [tokenizer.eos_id]
    assert max(longest) <= 2_000, longest
    assert tokens.tolist() == expected[: len(tokens)] and len(expected) - len(tokens) < 65  # the last partial block is dropped


def test_a_document_longer_than_a_tokenizing_batch_is_tokenized_as_blocks_are_needed_and_resumed_inside(
        tmp_path, tokenizer, monkeypatch):
    """A 200 MB line was tokenized whole: its ids (8 bytes each) held as tokens waiting to be packed,
    and saved in every checkpoint (issue #33). A document longer than a tokenizing batch is tokenized
    a run of pieces at a time as blocks are needed: the waiting tokens stay about one run, the tokens
    are the whole text's, and a stream resumed inside it goes on with the same batches. Sizes shrunk:
    batches of 4,000 characters, runs of 4 pieces of 500."""
    import minigpt.data
    import minigpt.sources

    monkeypatch.setattr(minigpt.data, "TOKENIZE_BATCH_CHARACTERS", 4_000)
    monkeypatch.setattr(minigpt.sources, "LONG_TEXT_CHARACTERS", 500)
    monkeypatch.setattr(minigpt.sources, "PIECES_PER_CALL", 4)
    long_text = " ".join(WORDS[number % len(WORDS)] for number in range(8_000))
    texts = ["Document 0: before it", long_text, "Document 2: after it"]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))

    def make():
        stream = TokenBlockStream([path], tokenizer, block_size=32, batch_size=4, loop=False)
        iter(stream)  # a finite stream starts over when iterated: from here on, next() only
        return stream

    def rest(stream):
        found = []
        while (batch := next(stream, None)) is not None:
            found.append(batch)
        return found

    stream, waiting = make(), []
    tokenize_more = stream._tokenize_more
    monkeypatch.setattr(stream, "_tokenize_more", lambda: (tokenize_more(), waiting.append(len(stream.pending_tokens)))[0])
    uninterrupted = rest(stream)
    tokens = torch.cat([uninterrupted[0][0][0, :1]] + [targets.flatten() for _, targets in uninterrupted])  # blocks overlap by one
    expected = [token for text in texts for token in tokenizer.encode(text) + [tokenizer.eos_id]]
    assert tokens.tolist() == expected[: len(tokens)] and len(expected) - len(tokens) < 33  # the last partial block is dropped
    assert len(long_text) > 40_000 and max(waiting) <= 4 * 500 + 33, max(waiting)

    interrupted = make()
    first = [next(interrupted) for _ in range(100)]
    state = interrupted.state_dict()
    assert 0 < state["long_document"]["characters"] < len(long_text) and len(state["pending_tokens"]) <= 4 * 500 + 33
    resumed = make()
    resumed.load_state_dict(state)
    for expected_batch, batch in zip(uninterrupted, first + rest(resumed), strict=True):
        assert torch.equal(expected_batch[0], batch[0]) and torch.equal(expected_batch[1], batch[1])


HUGE_LINE_TRAINING = """
import json, resource, sys
from minigpt.cli.main import main
megabytes, tokenizer, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
words = "the model reads text and learns to predict the next token from those before it".split()
with open(f"{directory}/huge.jsonl", "w") as file:  # written a megabyte at a time: the peak measured is training's
    file.write('{"text": "')
    for _ in range(megabytes):
        file.write(" ".join(words[number % len(words)] for number in range(200_000)) + " ")
    file.write('"}\\n')
status = main(["train", "--config", "tiny", "--data-files", f"{directory}/huge.jsonl", "--tokenizer", tokenizer,
               "--output-dir", f"{directory}/runs", "--max-steps", "2", "--num-epochs", "1", "--dtype", "float32", "--sample-tokens", "0", "--disable-monitoring"])
print(json.dumps({"status": status, "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.mark.slow  # a huge-file test: tokenizing 200 MB takes minutes
def test_a_200_megabyte_single_line_document_trains_in_under_one_and_a_half_gigabytes(tmp_path, tokenizer_file):
    """Issue #33: 30 MB of one line took 3.8 GB of memory, 200 MB grew past 18 GB. With the default
    --val-fraction the line is read five times: to find the 1% hold-out empty, to count its tokens for
    the fallback (one document cannot be both held out and trained on: no validation), to check that
    it fills a block, to count the epoch's rows (`--num-epochs 1`) and to train; it is tokenized whole
    twice. (50 MB of one line: 0.50 GB and 210 s on 2 shared cores.)"""
    result = subprocess.run([sys.executable, "-c", HUGE_LINE_TRAINING, "200", str(tokenizer_file), str(tmp_path)],
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    print(outcome)
    assert outcome["status"] == 0 and outcome["peak_bytes"] < 1.5e9, outcome


def test_a_looping_stream_reads_no_further_than_an_epoch_or_a_million_characters_at_a_time(tmp_path, tokenizer):
    """The tokenizer gets up to 64 documents at a time: on a file of one huge document, a looping
    stream filled that batch by reading the file 64 times over (64 copies of a 30 MB line in
    memory), and 64 long documents would be as bad. A batch ends at the end of an epoch, and once
    it holds a million characters."""
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "word " * 1_000}) + "\n")
    assert len(TokenBlockStream([one], tokenizer, block_size=16, batch_size=1)._read_documents()) == 1
    many = tmp_path / "many.jsonl"
    many.write_text((json.dumps({"text": "word " * 120_000}) + "\n") * 10)  # 600,000 characters each
    assert len(TokenBlockStream([many], tokenizer, block_size=16, batch_size=1)._read_documents()) == 2


def test_the_hold_out_fallback_counts_a_long_document_a_run_at_a_time(tmp_path, tokenizer, monkeypatch):
    """With the default --val-fraction, a one-document file leaves the 1% hold-out empty, and the
    fallback (`holdout_filling_one_block`) tokenized every document whole and kept all their ids:
    8 bytes a token, so a 200 MB line would have cost gigabytes before training began (issue #33).
    It needs only each document's token count, counted a run at a time: the memory it takes stays
    about the text's own, and the counts (so the fraction) are the whole-text tokenization's.
    Sizes shrunk: runs of 4 pieces of 500 characters."""
    import minigpt.sources
    from minigpt.data import holdout_filling_one_block

    long_text = " ".join(WORDS[number % len(WORDS)] for number in range(100_000))  # about 500,000 characters
    texts = [f"Document {number}: " + " ".join(WORDS[number % 7:]) for number in range(40)] + [long_text]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    whole = holdout_filling_one_block([path], tokenizer, block_size=32, val_fraction=0.01)  # this long text in runs of 1M: whole

    monkeypatch.setattr(minigpt.sources, "LONG_TEXT_CHARACTERS", 500)
    monkeypatch.setattr(minigpt.sources, "PIECES_PER_CALL", 4)
    tracemalloc.start()
    in_runs = holdout_filling_one_block([path], tokenizer, block_size=32, val_fraction=0.01)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert whole is not None and in_runs == whole
    assert peak < 4 * len(long_text), (peak, len(long_text))  # the ids alone: 8 bytes a character
