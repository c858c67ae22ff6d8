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

Bad input is never silently dropped: a JSONL line that is not valid UTF-8, not JSON, not an
object or lacks the text field is skipped and reported with its file and line number, and a
file that is mostly bad is refused.
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
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.data")

DATA_SUFFIXES = (".jsonl", ".txt")
MAX_TEXT_PIECE_BYTES = 64 * 1024  # a .txt piece ends at a blank line, or at a line boundary past this size
BAD_LINE_FRACTION = 0.5  # a file with more bad lines than this (once 20 lines are read) is refused
BAD_LINE_GRACE = 20
WARNINGS_PER_FILE = 10  # report this many bad lines of a file one by one, then only count them

def resolve_data_files(patterns: Sequence[str]) -> list[Path | str]:
    """Expand files, directories (searched recursively for .jsonl/.txt) and globs into a sorted list."""
    found: list[Path | str] = []
    for pattern in patterns:
        if pattern == BUILTIN_CORPUS:
            found.append(BUILTIN_CORPUS)
            continue
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
            if not matches:
                raise UserInputError(f"Directory {path} holds no .jsonl or .txt files.")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(pattern):
            matches = sorted(Path(match) for match in glob.glob(pattern, recursive=True) if Path(match).is_file())
            if not matches:
                raise UserInputError(f"No file matches {pattern}.")
        else:
            raise UserInputError(f"Data file {path} does not exist.")
        for match in matches:
            if match.suffix not in DATA_SUFFIXES:
                raise UserInputError(f"Data file {match} is neither .jsonl nor .txt; convert it or leave it out.")
            if match.stat().st_size == 0:
                raise UserInputError(f"Data file {match} is empty.")
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
        return Document(text=record[text_field])
    if isinstance(record.get("conversations"), list):
        return Document(conversations=record["conversations"])
    return f"no string field '{text_field}' (nor a 'conversations' list)"


def document_hash_fraction(document: Document) -> float:
    """A stable number in [0, 1) per document (Python's hash() changes between runs; this does not)."""
    if document.hash_fraction is not None:
        return document.hash_fraction
    content = document.text if document.text is not None else json.dumps(document.conversations, sort_keys=True)
    digest = hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=8).digest()
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


def iter_documents(sources: Sequence[Path | str], text_field: str = "text") -> Iterator[str]:
    """The text of every document of the sources, in order (chat records as their plain turns).

    Used to train tokenizers; bad lines are reported and skipped exactly as in training.
    """
    reader = DocumentReader(list(sources), text_field)
    while (document := reader.next_document()) is not None:
        if document.text is not None:
            yield document.text
        else:
            yield "\n".join(str(turn.get("content", "")) for turn in document.conversations if isinstance(turn, dict))


class DocumentReader:
    """Reads documents one at a time from a list of sources; its position is three integers."""

    def __init__(self, sources: list, text_field: str, report: DataReport | None = None):
        self.sources, self.text_field = sources, text_field
        self.report = report or DataReport()
        self.source_index, self.offset, self.line_number = 0, 0, 0
        self.file: BinaryIO | None = None
        self.lines_read = self.bad_in_file = 0  # of the current file, for the bad-line rule
        self.warn = True

    def position(self) -> list[int]:
        return [self.source_index, self.offset, self.line_number]

    def seek(self, position: Sequence[int]) -> None:
        self.close()
        self.source_index, self.offset, self.line_number = (int(value) for value in position)

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
            raise UserInputError(f"Every line of {source} is bad (see the warnings above); check its format or --text-field.")
        self.close()
        self.source_index += 1
        self.offset = self.line_number = self.lines_read = self.bad_in_file = 0

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
        if len(self.report.examples) < WARNINGS_PER_FILE:
            self.report.examples.append(f"{where}: {reason}")
        if self.warn and self.bad_in_file <= WARNINGS_PER_FILE:
            log.warning("Skipping %s: %s", where, reason)
        if self.lines_read >= BAD_LINE_GRACE and self.bad_in_file > BAD_LINE_FRACTION * self.lines_read:
            raise UserInputError(
                f"{path} has {self.bad_in_file} bad lines in its first {self.lines_read} (e.g. line {self.line_number}: {reason}); "
                "fix the file or check --text-field."
            )

    def _next_text_piece(self, path: Path) -> Document | None:
        """A paragraph of a .txt file: lines up to and including a blank line (or ~64 KB)."""
        file = self._open(path)
        lines: list[bytes] = []
        size = 0
        first_line = self.line_number + 1
        while raw := file.readline():
            self.offset += len(raw)
            self.line_number += 1
            lines.append(raw)
            size += len(raw)
            has_content = any(line.strip() for line in lines)
            if (not raw.strip() and has_content) or size >= MAX_TEXT_PIECE_BYTES:
                break
        if not lines:
            return None
        at_end = file.read(1) == b""
        file.seek(self.offset)
        try:
            text = b"".join(lines).decode("utf-8")
        except UnicodeDecodeError:
            self.lines_read += 1
            self._bad_line(path, f"lines {first_line}-{self.line_number} are not valid UTF-8")
            return Document(text="", ends_document=at_end)
        self.lines_read += 1
        return Document(text=text, ends_document=at_end)


class TokenBlockStream(IterableDataset):
    """Batches of (inputs, targets), each (batch_size, block_size) int64, streamed from the sources.

    split="train"/"val" keeps the documents on one side of a stable hash hold-out of
    `val_fraction`; "all" keeps every document. With loop=True (training) the stream starts a
    new epoch at the end of the data and never ends; with loop=False (evaluation) it ends, and
    starts over from the beginning each time it is iterated.
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
        self.report = report or DataReport()
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
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = []
        while len(blocks) < self.batch_size:
            block = self._next_block()
            if block is None:
                break
            blocks.append(block)
        if not blocks:
            raise StopIteration
        tokens = torch.from_numpy(np.stack([tokens for tokens, _ in blocks]))
        mask = torch.from_numpy(np.stack([mask for _, mask in blocks]))
        inputs = tokens[:, :-1]
        targets = tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
        return inputs, targets

    def check_not_empty(self) -> None:
        """Read (on a fresh copy) until one block exists; explain in one sentence if none can."""
        probe = TokenBlockStream(
            self.sources, self.tokenizer, self.block_size, 1, split=self.split, val_fraction=self.val_fraction,
            loop=False, rank=self.shard, world_size=self.num_shards, text_field=self.text_field,
            max_documents=self.max_documents, tokenize_batch_size=8, assistant_only_loss=self.assistant_only_loss,
        )
        if probe._next_block() is None:
            where = ", ".join(str(source) for source in self.sources)
            if self.split == "val":
                raise UserInputError(
                    f"No validation data: the {self.val_fraction:.1%} hold-out of {where} does not fill one block of "
                    f"{self.block_size + 1} tokens; raise --val-fraction or pass --val-data-files."
                )
            raise UserInputError(f"{where} does not hold enough text for one block of {self.block_size + 1} tokens.")
        probe.reader.close()

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
                ids, assistant = self._render_chat(document)
                mask = assistant if self.assistant_only_loss else [True] * len(ids)
            if document.ends_document:
                ids = list(ids) + [self.tokenizer.eos_id]
                mask = mask + [True]
            token_chunks.append(np.asarray(ids, dtype=np.int64))
            mask_chunks.append(np.asarray(mask, dtype=bool))
        self.pending_tokens = np.concatenate(token_chunks)
        self.pending_mask = np.concatenate(mask_chunks)
        return True

    def _render_chat(self, document: Document) -> tuple[list[int], list[bool]]:
        try:
            return self.tokenizer.render_chat(document.conversations)
        except UserInputError as error:
            log.warning("Skipping a chat record before %s:%d: %s", self.reader.sources[self.reader.source_index],
                        self.reader.line_number, error)
            return [], []

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
                    raise UserInputError(
                        f"No {self.split} documents for this stream in {', '.join(map(str, self.sources))}"
                        + (f" (shard {self.shard} of {self.num_shards})." if self.num_shards > 1 else ".")
                    )
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
        self.reader.seek([0, 0, 0])
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
