"""From files on disk to batches of token ids, streamed.

    sources (.jsonl, .txt, the built-in corpus)
      -> documents, read lazily line by line        (memory does not grow with the file)
      -> tokenized in batches, <|endoftext|> after each document
      -> packed into blocks of block_size + 1 tokens (no padding: documents run on into each other)
      -> a shuffle buffer of blocks                  (so neighbouring blocks are not always batched together)
      -> (x, y) batches: y is x shifted left by one  (each position predicts the next token)

The stream's position (which file, which byte, the tokens waiting to be packed, the shuffle
buffer, the random generator) is all in `state_dict()`, so a resumed run sees exactly the
batches the interrupted run would have seen.

A .jsonl file holds one document per line: the `text` field (the name is configurable), or a
chat record `{"conversations": [{"role": ..., "content": ...}, ...]}` rendered through the
tokenizer's chat template. A .txt file is one document, read in pieces that end at blank lines
(or after about 64 KB), with <|endoftext|> only after its last piece.

Bad input is never silently dropped: a JSONL line that is not valid UTF-8, not JSON, not an
object, lacks the text field or holds a malformed chat record is skipped and reported with its
file and line number, and a file that is mostly bad is refused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from minigpt.corpus import BUILTIN_CORPUS, builtin_corpus, builtin_corpus_fingerprint
from minigpt.errors import UserInputError
from minigpt.model import IGNORE_INDEX
from minigpt.token_cache import TokenCache
from minigpt.tokenizer import CHAT_ROLES, Tokenizer

log = logging.getLogger("minigpt.data")

DATA_SUFFIXES = (".jsonl", ".txt")
MAX_TEXT_PIECE_BYTES = 64 * 1024  # a .txt piece ends at a blank line, or at the first line end past this size
BAD_LINE_FRACTION = 0.5  # a file with more bad lines than this (once 20 lines are read) is refused
BAD_LINE_GRACE = 20
WARNINGS_PER_FILE = 10  # report this many bad lines of a file one by one, then only count them
REPORT_EXAMPLES = 10  # DataReport keeps this many "file:line: reason" examples


def resolve_data_files(patterns: Sequence[str]) -> list[Path | str]:
    """Expand files, directories (searched recursively for .jsonl/.txt) and globs into a list of
    files: each pattern's matches sorted, the patterns in the order given, no file twice.
    "builtin" stands for the built-in corpus and is passed through as it is."""
    found: list[Path | str] = []
    for pattern in patterns:
        if pattern == BUILTIN_CORPUS:
            found.append(BUILTIN_CORPUS)
            continue
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
            if not matches:
                raise UserInputError(f"Directory {path} holds no .jsonl or .txt files; check the path or add files to it.")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(pattern):
            matches = sorted(Path(match) for match in glob.glob(pattern, recursive=True) if Path(match).is_file())
            if not matches:
                raise UserInputError(f"No file matches {pattern}; check the directory and the pattern.")
        else:
            raise UserInputError(
                f"Data file {path} does not exist; check the path (or use '{BUILTIN_CORPUS}' for the built-in corpus)."
            )
        for match in matches:
            if match.suffix not in DATA_SUFFIXES:
                raise UserInputError(f"Data file {match} is neither .jsonl nor .txt; convert it or leave it out.")
            if match.stat().st_size == 0:
                raise UserInputError(f"Data file {match} is empty; fill it or leave it out.")
            if match not in found:
                found.append(match)
    return found


@dataclass
class Document:
    """One unit of training text, with where the next one starts."""

    text: str | None = None  # plain text ...
    conversations: list | None = None  # ... or a chat record ...
    tokens: np.ndarray | None = None  # ... or token ids from a token cache (<|endoftext|> included)
    hash_fraction: float | None = None  # known in advance for cached documents
    ends_document: bool = True  # append <|endoftext|> after it (a .txt file's pieces: only the last)


@dataclass
class DataReport:
    """What was read: kept documents and skipped lines, with the first few reasons."""

    documents: int = 0
    bad_lines: int = 0
    examples: list[str] = field(default_factory=list)


def _parse_jsonl_line(raw: bytes, text_field: str) -> Document | str:
    """A Document, or the reason the line is bad."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not valid UTF-8"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg})"
    if not isinstance(record, dict):
        return "not a JSON object"
    if isinstance(record.get(text_field), str):
        if not _is_unicode_text(record[text_field]):
            return f"field '{text_field}' holds a lone surrogate escape such as \\ud800"
        return Document(text=record[text_field])
    if isinstance(record.get("conversations"), list):
        return _parse_conversations(record["conversations"])
    return f"no string field '{text_field}' (nor a 'conversations' list)"


def _parse_conversations(turns: list) -> Document | str:
    """A chat record, checked here so that a bad one is reported with its line like any other."""
    if not turns:
        return "'conversations' is an empty list"
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or turn.get("role") not in CHAT_ROLES or not isinstance(turn.get("content"), str):
            roles = ", ".join(CHAT_ROLES)
            return f"turn {number} of 'conversations' is not an object with a 'role' ({roles}) and a string 'content'"
        if not _is_unicode_text(turn["content"]):
            return f"turn {number} of 'conversations' holds a lone surrogate escape such as \\ud800"
    return Document(conversations=turns)


def _is_unicode_text(text: str) -> bool:
    """False for a string with a lone surrogate ("\\ud800" is valid JSON but not text): the tokenizer
    would fail on it with an obscure TypeError in the middle of training."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def document_hash_fraction(document: Document) -> float:
    """A stable number in [0, 1) per document (Python's hash() changes between runs; this does not)."""
    if document.hash_fraction is not None:
        return document.hash_fraction
    content = document.text if document.text is not None else json.dumps(document.conversations, sort_keys=True)
    digest = hashlib.blake2b(content.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sources_fingerprint(sources: Sequence[Path | str]) -> list:
    """What identifies the content of the sources: each file's path, size and modification time
    (the built-in corpus: its own fingerprint). It changes when any file changes."""
    parts = []
    for source in sources:
        if source == BUILTIN_CORPUS:
            parts.append(["builtin", builtin_corpus_fingerprint()])
        else:
            stat = Path(source).stat()
            parts.append([str(Path(source).resolve()), stat.st_size, stat.st_mtime_ns])
    return parts


def iter_documents(sources: Sequence[Path | str], text_field: str = "text", report: DataReport | None = None) -> Iterator[str]:
    """The text of every document of the sources, in order (chat records as their turns' contents).

    Used to train tokenizers; bad lines are reported and skipped exactly as in training, and
    counted in `report` if one is given.
    """
    reader = DocumentReader(list(sources), text_field, report)
    while (document := reader.next_document()) is not None:
        if document.text is not None:
            yield document.text
        else:
            yield "\n".join(turn["content"] for turn in document.conversations)


class DocumentReader:
    """Reads documents one at a time from a list of sources; its position is five integers."""

    def __init__(self, sources: list, text_field: str, report: DataReport | None = None):
        self.sources, self.text_field = sources, text_field
        self.report = report if report is not None else DataReport()
        self.source_index, self.offset, self.line_number = 0, 0, 0
        self.file: BinaryIO | None = None
        self.lines_read = self.bad_in_file = 0  # of the current file, for the bad-line rule
        self.first_bad_line = ""  # of the current file, to quote if every line turns out bad
        self.warn = True  # log bad lines (off once a pass has reported them)

    def position(self) -> list[int]:
        # The bad-line counts belong to it: a run resumed near the end of a file must judge the
        # file on all its lines, not only on the few read since the restart.
        return [self.source_index, self.offset, self.line_number, self.lines_read, self.bad_in_file]

    def seek(self, position: Sequence[int]) -> None:
        self.close()
        self.source_index, self.offset, self.line_number, self.lines_read, self.bad_in_file = (int(value) for value in position)
        self.first_bad_line = ""

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def next_document(self) -> Document | None:
        """The next document, or None at the end of the last source."""
        while self.source_index < len(self.sources):
            source = self.sources[self.source_index]
            if isinstance(source, TokenCache):
                document = self._next_cached(source)
            elif source == BUILTIN_CORPUS:
                document = self._next_builtin()
            elif Path(source).suffix == ".txt":
                document = self._next_text_piece(Path(source))
            else:
                document = self._next_jsonl(Path(source))
            if document is not None:
                self.report.documents += 1
                return document
            self._finish_source()
        return None

    def _finish_source(self) -> None:
        source = self.sources[self.source_index]
        if self.lines_read and self.bad_in_file == self.lines_read:
            raise UserInputError(f"Every line of {source} is bad (e.g. {self.first_bad_line}); check its format or --text-field.")
        self.close()
        self.source_index += 1
        self.offset = self.line_number = self.lines_read = self.bad_in_file = 0
        self.first_bad_line = ""

    def _open(self, path: Path) -> BinaryIO:
        if self.file is None:
            self.file = open(path, "rb")
            self.file.seek(self.offset)
        return self.file

    def _next_builtin(self) -> Document | None:
        documents = builtin_corpus()  # held in memory: the position is simply an index
        if self.offset >= len(documents):
            return None
        self.offset += 1
        return Document(text=documents[self.offset - 1])

    def _next_cached(self, cache: TokenCache) -> Document | None:
        if self.offset >= cache.documents:
            return None
        self.offset += 1
        index = self.offset - 1
        return Document(tokens=cache.document(index), hash_fraction=float(cache.hash_fractions[index]), ends_document=False)

    def _next_jsonl(self, path: Path) -> Document | None:
        file = self._open(path)
        while raw := file.readline():
            self.offset += len(raw)
            self.line_number += 1
            if not raw.strip():
                continue
            self.lines_read += 1
            parsed = _parse_jsonl_line(raw, self.text_field)
            if isinstance(parsed, Document):
                return parsed
            self._bad_line(path, parsed)
        return None

    def _bad_line(self, path: Path, reason: str) -> None:
        self.bad_in_file += 1
        self.report.bad_lines += 1
        where = f"{path}:{self.line_number}"
        if self.bad_in_file == 1:
            self.first_bad_line = f"line {self.line_number}: {reason}"
        if len(self.report.examples) < REPORT_EXAMPLES:
            self.report.examples.append(f"{where}: {reason}")
        if self.warn and self.bad_in_file <= WARNINGS_PER_FILE:
            log.warning("Skipping %s: %s", where, reason)
        if self.lines_read >= BAD_LINE_GRACE and self.bad_in_file > BAD_LINE_FRACTION * self.lines_read:
            raise UserInputError(
                f"{path} has {self.bad_in_file} bad lines in its first {self.lines_read} (e.g. line {self.line_number}: {reason}); "
                "fix the file or check --text-field."
            )

    def _next_text_piece(self, path: Path) -> Document | None:
        """A paragraph of a .txt file: lines up to and including a blank line.

        A paragraph ends early at the first line boundary past MAX_TEXT_PIECE_BYTES, and a line
        longer than that (a file with no line breaks at all, say) is cut on a character boundary,
        so memory stays bounded whatever the file looks like.
        """
        file = self._open(path)
        piece = bytearray()
        has_content = False  # blank lines before any text stay with the piece they precede
        first_line = self.line_number + 1
        while raw := file.readline(MAX_TEXT_PIECE_BYTES):
            if len(raw) == MAX_TEXT_PIECE_BYTES and not raw.endswith(b"\n"):  # an overlong line: the rest comes next
                whole = raw[: _whole_characters(raw)]
                self.offset += len(whole)
                piece += whole
                break
            self.offset += len(raw)
            self.line_number += 1
            piece += raw
            is_blank = not raw.strip()
            if (is_blank and has_content) or len(piece) >= MAX_TEXT_PIECE_BYTES:
                break
            has_content = has_content or not is_blank
        if not piece:
            return None
        file.seek(self.offset)  # back to the end of the piece, where a cut line goes on
        at_end = file.read(1) == b""
        file.seek(self.offset)
        self.lines_read += 1
        try:
            return Document(text=piece.decode("utf-8"), ends_document=at_end)
        except UnicodeDecodeError:
            self._bad_line(path, f"the paragraph starting at line {first_line} is not valid UTF-8")
            return Document(text="", ends_document=at_end)


def _whole_characters(chunk: bytes) -> int:
    """The length of `chunk` without a UTF-8 character cut off at its end."""
    for back in range(1, min(4, len(chunk)) + 1):
        byte = chunk[-back]
        if byte < 0x80:  # ASCII: nothing is cut
            return len(chunk)
        if byte >= 0xC0:  # the first byte of a character of 2, 3 or 4 bytes
            length = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(chunk) if back >= length else len(chunk) - back
    return len(chunk)  # not UTF-8 at all: the decoder will say so


class TokenBlockStream(IterableDataset):
    """Batches of (inputs, targets), each (batch_size, block_size) int64, streamed from the sources.

    split="train"/"val" keeps the documents on one side of a stable hash hold-out of
    `val_fraction`; "all" keeps every document. With loop=True (training) the stream starts a
    new epoch at the end of the data and never ends; with loop=False (evaluation) it ends, and
    starts over from the beginning each time it is iterated (so only a training stream's
    position is worth saving). A stream that cannot fill a single block raises UserInputError
    when first read; `check_not_empty()` finds that out up front.
    """

    def __init__(
        self,
        sources: Sequence[Path | str],
        tokenizer: Tokenizer,
        block_size: int,
        batch_size: int,
        *,
        split: str = "all",
        val_fraction: float = 0.0,
        shuffle_buffer: int = 0,
        seed: int = 0,
        loop: bool = True,
        rank: int = 0,
        world_size: int = 1,
        text_field: str = "text",
        max_documents: int = 0,
        tokenize_batch_size: int = 64,
        assistant_only_loss: bool = False,
        report: DataReport | None = None,
    ):
        super().__init__()
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split!r}")
        self.sources, self.tokenizer = list(sources), tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.split, self.val_fraction = split, val_fraction
        self.shuffle_buffer, self.seed, self.loop = shuffle_buffer, seed, loop
        self.rank, self.world_size = rank, world_size
        self.shard, self.num_shards = rank, world_size  # refined per DataLoader worker in __iter__
        self.text_field, self.max_documents = text_field, max_documents
        self.tokenize_batch_size, self.assistant_only_loss = tokenize_batch_size, assistant_only_loss
        self.report = report if report is not None else DataReport()
        self.passes = 0  # of a finite stream: bad lines are reported on the first pass only
        self._reset()

    # -- position ------------------------------------------------------------------------------

    def _reset(self) -> None:
        self.reader = DocumentReader(self.sources, self.text_field, self.report)
        self.epoch = 0
        self.document_index = 0  # documents read this epoch (all splits), for sharding
        self.accepted_documents = 0  # documents of this split read this epoch, for max_documents
        self.shard_documents = 0  # of those, documents of this shard
        self.pending_tokens = np.zeros(0, dtype=np.int64)  # tokenized, not yet packed into a block
        self.pending_mask = np.zeros(0, dtype=bool)  # True where the token is a training target
        self.buffer: list[tuple[np.ndarray, np.ndarray]] = []  # the shuffle buffer of blocks
        self.rng = random.Random(self.seed)
        self.blocks_this_pass = 0  # a finite stream that ends with none is empty: an error, not zero batches

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here, as tensors and plain values."""
        return {
            "reader": self.reader.position(), "epoch": self.epoch, "document_index": self.document_index,
            "accepted_documents": self.accepted_documents, "shard_documents": self.shard_documents,
            "pending_tokens": torch.from_numpy(self.pending_tokens.copy()),
            "pending_mask": torch.from_numpy(self.pending_mask.copy()),
            "buffer_tokens": [torch.from_numpy(tokens.copy()) for tokens, _ in self.buffer],
            "buffer_mask": [torch.from_numpy(mask.copy()) for _, mask in self.buffer],
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.seek(state["reader"])
        self.reader.warn = state["epoch"] == 0
        self.epoch, self.document_index = state["epoch"], state["document_index"]
        self.accepted_documents, self.shard_documents = state["accepted_documents"], state["shard_documents"]
        self.pending_tokens = state["pending_tokens"].numpy().copy()
        self.pending_mask = state["pending_mask"].numpy().copy()
        self.buffer = [(tokens.numpy().copy(), mask.numpy().copy()) for tokens, mask in zip(state["buffer_tokens"], state["buffer_mask"])]
        self.rng.setstate(state["rng"])

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> "TokenBlockStream":
        worker = get_worker_info()
        if worker is not None:  # inside a DataLoader worker: this worker's share of this rank's share
            self.shard = self.rank * worker.num_workers + worker.id
            self.num_shards = self.world_size * worker.num_workers
        if not self.loop:
            self._reset()
            self.reader.warn = self.passes == 0
            self.passes += 1
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = []
        while len(blocks) < self.batch_size:
            block = self._next_block()
            if block is None:
                break
            blocks.append(block)
        if not blocks:
            if self.blocks_this_pass == 0 and get_worker_info() is None:  # another worker may have data
                raise self._empty_error()
            raise StopIteration
        self.blocks_this_pass += len(blocks)
        tokens = torch.from_numpy(np.stack([tokens for tokens, _ in blocks]))
        mask = torch.from_numpy(np.stack([mask for _, mask in blocks]))
        inputs = tokens[:, :-1]
        targets = tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
        return inputs, targets

    def check_not_empty(self) -> None:
        """Read (on a fresh copy, leaving this stream untouched) until one block exists; raise
        UserInputError if none can, so a run fails at its start rather than at its first evaluation."""
        probe = TokenBlockStream(
            self.sources, self.tokenizer, self.block_size, 1, split=self.split, val_fraction=self.val_fraction,
            loop=False, rank=self.shard, world_size=self.num_shards, text_field=self.text_field,
            max_documents=self.max_documents, tokenize_batch_size=8, assistant_only_loss=self.assistant_only_loss,
        )
        probe.reader.warn = False  # this stream reports the bad lines when it reads them itself
        if probe._next_block() is None:
            raise self._empty_error()
        probe.reader.close()

    def _empty_error(self) -> UserInputError:
        where = ", ".join(str(source) for source in self.sources)
        shard = f" for shard {self.shard} of {self.num_shards}" if self.num_shards > 1 else ""
        block = f"one block of {self.block_size + 1} tokens"
        if self.split == "val":
            return UserInputError(
                f"No validation data{shard}: the {self.val_fraction:.1%} hold-out of {where} does not fill {block}; "
                "raise --val-fraction or pass --val-data-files."
            )
        if self.split == "train":
            return UserInputError(
                f"No training data{shard}: {where} without its {self.val_fraction:.1%} validation hold-out does not fill "
                f"{block}; add data, lower --block-size or lower --val-fraction."
            )
        return UserInputError(f"No data{shard}: {where} does not fill {block}; add data or lower --block-size.")

    def _next_block(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The next block (tokens, target mask) of block_size + 1, through the shuffle buffer."""
        while True:
            if self.shuffle_buffer and len(self.buffer) >= self.shuffle_buffer:
                # Reservoir-style: emit a random block and put the new one in its place.
                fresh = self._next_packed_block()
                index = self.rng.randrange(len(self.buffer))
                emitted = self.buffer[index]
                if fresh is None:
                    self.buffer.pop(index)
                else:
                    self.buffer[index] = fresh
                return emitted
            fresh = self._next_packed_block()
            if fresh is None:  # the data has ended (finite stream): drain the buffer in random order
                return self.buffer.pop(self.rng.randrange(len(self.buffer))) if self.buffer else None
            if not self.shuffle_buffer:
                return fresh
            self.buffer.append(fresh)

    def _next_packed_block(self) -> tuple[np.ndarray, np.ndarray] | None:
        length = self.block_size + 1
        while len(self.pending_tokens) < length:
            if not self._tokenize_more():
                return None
        block = (self.pending_tokens[:length].copy(), self.pending_mask[:length].copy())
        # The next block starts with this block's last token, so every token is predicted once.
        self.pending_tokens = self.pending_tokens[self.block_size :]
        self.pending_mask = self.pending_mask[self.block_size :]
        return block

    def _tokenize_more(self) -> bool:
        """Read and tokenize the next batch of documents; False when a finite stream has ended."""
        documents = self._read_documents()
        if not documents:
            return False
        texts = [document.text for document in documents if document.text is not None]
        encoded = iter(self.tokenizer.encode_batch(texts)) if texts else iter(())
        token_chunks, mask_chunks = [self.pending_tokens], [self.pending_mask]
        for document in documents:
            if document.tokens is not None:  # already tokenized, in a token cache
                ids, mask = document.tokens, [True] * len(document.tokens)
            elif document.text is not None:
                ids = next(encoded)
                mask = [True] * len(ids)
            else:
                ids, assistant = self.tokenizer.render_chat(document.conversations)
                mask = assistant if self.assistant_only_loss else [True] * len(ids)
            if document.ends_document:
                ids = list(ids) + [self.tokenizer.eos_id]
                mask = mask + [True]
            token_chunks.append(np.asarray(ids, dtype=np.int64))
            mask_chunks.append(np.asarray(mask, dtype=bool))
        self.pending_tokens = np.concatenate(token_chunks)
        self.pending_mask = np.concatenate(mask_chunks)
        return True

    def _read_documents(self) -> list[Document]:
        """Up to tokenize_batch_size documents of this split and shard; [] when a finite stream ends."""
        documents: list[Document] = []
        while len(documents) < self.tokenize_batch_size:
            capped = self.max_documents and self.accepted_documents >= self.max_documents
            document = None if capped else self.reader.next_document()
            if document is None:  # the end of the data, or of the cap
                if not self.loop:
                    break
                if self.shard_documents == 0:  # a whole epoch gave nothing: another would not either
                    raise self._empty_error()
                self._start_next_epoch()
                continue
            index = self.document_index
            self.document_index += 1
            if self.split != "all" and (document_hash_fraction(document) < self.val_fraction) != (self.split == "val"):
                continue
            self.accepted_documents += 1
            if index % self.num_shards == self.shard:
                self.shard_documents += 1
                documents.append(document)
        return documents

    def _start_next_epoch(self) -> None:
        self.epoch += 1
        self.document_index = self.accepted_documents = self.shard_documents = 0
        self.reader.seek([0, 0, 0, 0, 0])
        self.reader.warn = False  # bad lines were reported in the first epoch


class RepeatedBatch:
    """The same batch forever (--overfit-batch): the first check when a run will not learn.

    A model that cannot drive the loss on one batch to about zero has a bug, not a data problem.
    """

    def __init__(self, stream: TokenBlockStream):
        self.inputs, self.targets = next(iter(stream))

    def __iter__(self) -> "RepeatedBatch":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs, self.targets

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs, "targets": self.targets}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inputs, self.targets = state["inputs"], state["targets"]


class ParallelBatches:
    """Training batches read by `workers` DataLoader processes, each streaming its own share of
    the documents (the stream shards itself by worker), so tokenizing never waits in line with
    the model.

    A worker's position lives in another process, so a checkpoint records how many batches were
    consumed instead, and a resumed run replays that many: the DataLoader hands out the workers'
    batches in a fixed round-robin order, so the replay reaches exactly the same place (at the
    cost of reading the data up to it again).
    """

    def __init__(self, stream: TokenBlockStream, workers: int, pin_memory: bool = False):
        self.stream, self.workers, self.pin_memory = stream, workers, pin_memory
        self.consumed = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory)
        batches = iter(loader)
        for _ in range(self.consumed):  # replay up to the saved position
            next(batches)
        for batch in batches:
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed_batches": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = state["consumed_batches"]
