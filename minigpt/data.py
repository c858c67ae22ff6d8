"""From documents to batches of token ids, streamed.

    sources (.jsonl, .json, .txt, the built-in sets; read by minigpt.sources)
      -> documents, read lazily                     (memory does not grow with the file)
      -> tokenized in batches, <|endoftext|> after each document
      -> packed into blocks of block_size + 1 tokens (no padding: documents run on into each other)
         or, for chat fine-tuning, whole conversations: as many as fit in a row (packed, the
         default), or one per row; either way cut at the end if longer than a row, then padded
      -> a shuffle buffer of blocks                  (so neighbouring blocks are not always batched together)
      -> (x, y) batches: y is x shifted left by one  (each position predicts the next token);
         packed conversations add each token's position in its conversation: (x, y, positions)

Why chat fine-tuning keeps conversations whole: run on into each other as in pretraining, a row
would hold the end of one conversation and the start of the next, and attention would let an
answer look at another conversation, or a block would start with an answer whose question is in
the block before. So a conversation never straddles two rows, and several in one row are kept
apart by the model: each token's position restarts at 0 where its conversation starts, and
attention lets a token see only the earlier tokens of its own conversation
(`minigpt.model.packed_attention_mask`), so each conversation's loss is the one it would have
on a row of its own. One per row (--packing off) needs no mask but pays for the padding: on
the built-in chat set a row is about a quarter conversation. Padding is never a target, and
each batch is cut after its last target (attention is causal, so what follows a row's last
target never changes its loss).

A document longer than a tokenizing batch (TOKENIZE_BATCH_CHARACTERS: a whole book on one JSONL
line, say) is tokenized a run of about a million characters at a time, as blocks are needed
(`LongDocument`), so the tokens waiting to be packed stay a few megabytes whatever its length.

The stream's position (which file, which byte, how far into a long document, the tokens waiting
to be packed, the shuffle buffer, the random generator, and its `EpochState`: passes completed
and how far into this one) is all in `state_dict()`, so a resumed run sees exactly the batches
the interrupted run would have seen.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from minigpt.errors import UserInputError
from minigpt.loss import IGNORE_INDEX
from minigpt.sources import (TOKENIZE_BATCH_CHARACTERS, DataReport, Document, DocumentReader, document_batches,
                             document_hash_fraction, document_runs, encode_documents, long_document_runs)
from minigpt.tokenizer import Tokenizer

# A batch of one-conversation rows is cut after its last target, rounded up to a multiple of this,
# so that a compiled model meets a handful of shapes, not one per batch.
ROW_WIDTH_STEP = 32
HOLDOUT_BATCH_DOCUMENTS = 64  # documents tokenized together to count their tokens (or TOKENIZE_BATCH_CHARACTERS)


@dataclass
class EpochState:
    """Where a training stream stands in its passes over the data: the one epoch record of its
    saved position (`state_dict()["epoch"]`), shared by every kind of training stream.

    An epoch is one pass over the training data. A looping stream starts the next pass where one
    ends, so `passes` counts those completed and `position` says how far into the current one
    the stream has read: documents of its split for text (`TokenBlockStream`), records for
    classification (`minigpt.labelled_data.ClassificationBatches`).

    It is saved as a dict of its fields: a field added later (with a default) leaves older
    checkpoints readable, so the resume format need not change again.
    """

    passes: int = 0
    position: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_saved(cls, saved: dict[str, int] | int, position: int = 0) -> "EpochState":
        """The state `as_dict` saved; or, from a checkpoint older than this record, the pass number
        alone (an int) with the position the stream kept beside it."""
        if isinstance(saved, dict):
            return cls(**{name: int(value) for name, value in saved.items()})
        return cls(passes=int(saved), position=int(position))


@dataclass
class LongDocument:
    """A document whose text alone fills a tokenizing batch, being tokenized a run at a time
    (`minigpt.sources.long_document_runs`). Its place is saved as the reader's position before it and
    how many of its characters are tokenized: a resumed stream reads it again and goes on from there."""

    document: Document
    reader_position: list[int]
    characters: int = 0  # tokenized so far
    runs: Iterator[tuple[np.ndarray, int]] | None = None  # the rest, started on first use

    def next_run(self, tokenizer: Tokenizer) -> tuple[np.ndarray, bool]:
        """The ids of the next run (BOS before the first, EOS after the last, as for any document)
        and whether it was the last."""
        if self.runs is None:
            self.runs = long_document_runs(self.document, tokenizer, self.characters)
        ids, self.characters = next(self.runs)
        return ids, self.characters >= len(self.document.text)


def rounded_width(columns: int, limit: int) -> int:
    """`columns` rounded up to a multiple of ROW_WIDTH_STEP, never past `limit`."""
    return min(limit, -(-columns // ROW_WIDTH_STEP) * ROW_WIDTH_STEP)


def padded_row(tokens: np.ndarray, mask: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens and target mask padded to `length` with pad_id, never a target."""
    padding = length - len(tokens)
    return (np.concatenate([tokens, np.full(padding, pad_id, dtype=np.int64)]), np.concatenate([mask, np.zeros(padding, dtype=bool)]))


def trimmed_width(target_mask: torch.Tensor, block_size: int) -> int:
    """How many columns of a padded batch matter: up to its last target, rounded up to
    ROW_WIDTH_STEP (never past the block). Later columns are padding or text after the last answer,
    which causal attention keeps from every earlier position, so dropping them changes no loss."""
    columns = target_mask.any(dim=0).nonzero()
    last = int(columns[-1]) + 1 if len(columns) else 1
    return rounded_width(last, block_size)


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
        one_document_per_row: bool = False,
        pack_documents: bool = False,
        report: DataReport | None = None,
    ):
        super().__init__()
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split!r}")
        if one_document_per_row and pack_documents:
            raise ValueError("one_document_per_row and pack_documents are two ways of laying out whole documents: choose one")
        self.sources, self.tokenizer = list(sources), tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.split, self.val_fraction = split, val_fraction
        self.shuffle_buffer, self.seed, self.loop = shuffle_buffer, seed, loop
        self.rank, self.world_size = rank, world_size  # torchrun's processes: each keeps its batches of every round
        self.shard, self.num_shards = 0, 1  # the documents' shards: one per DataLoader worker, set in __iter__
        self.text_field, self.max_documents = text_field, max_documents
        self.tokenize_batch_size, self.assistant_only_loss = tokenize_batch_size, assistant_only_loss
        # Whole documents (chat fine-tuning): one per row, or as many as fit (each with positions of its own).
        self.one_document_per_row, self.pack_documents = one_document_per_row, pack_documents
        self.report = report if report is not None else DataReport()
        self.passes = 0  # of a finite stream: bad lines are reported on the first pass only
        self._reset()

    # -- position ------------------------------------------------------------------------------

    def _reset(self) -> None:
        self.reader = DocumentReader(self.sources, self.text_field, self.report)
        self.epoch = EpochState()  # position: documents of this split read this pass (for sharding and max_documents)
        self.shard_documents = 0  # of those, documents of this shard
        self.pending_tokens = np.zeros(0, dtype=np.int64)  # tokenized, not yet packed into a block
        self.pending_mask = np.zeros(0, dtype=bool)  # True where the token is a training target
        self.pending_positions = np.zeros(0, dtype=np.int64)  # pack_documents: each token's position in its document
        self.long_document: LongDocument | None = None  # a document too long to tokenize at once, begun
        self.reader_position_before_last = self.reader.position()  # of the last document _read_documents kept
        self.buffer: list[tuple[np.ndarray, ...]] = []  # the shuffle buffer of blocks: (tokens, mask[, positions])
        self.rng = random.Random(self.seed)
        self.blocks_this_pass = 0  # a finite stream that ends with none is empty: an error, not zero batches
        self.learnable_documents = 0  # this pass's documents with a target (assistant-only: an assistant turn)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here, as tensors and plain values."""
        state = {
            "reader": self.reader.position(), "epoch": self.epoch.as_dict(), "shard_documents": self.shard_documents,
            "pending_tokens": torch.from_numpy(self.pending_tokens.copy()),
            "pending_mask": torch.from_numpy(self.pending_mask.copy()),
            "long_document": None if self.long_document is None else {
                "reader": self.long_document.reader_position, "characters": self.long_document.characters},
            "buffer_tokens": [torch.from_numpy(block[0].copy()) for block in self.buffer],
            "buffer_mask": [torch.from_numpy(block[1].copy()) for block in self.buffer],
            "rng": self.rng.getstate(),
        }
        if self.pack_documents:  # the layout is recorded (a position without it is one of unpacked rows), and the positions
            state["pack_documents"] = True
            state["pending_positions"] = torch.from_numpy(self.pending_positions.copy())
            state["buffer_positions"] = [torch.from_numpy(block[2].copy()) for block in self.buffer]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "consumed_batches" in state:  # saved by ParallelBatches: read by worker processes, in another order
            raise worker_count_changed(state.get("workers"), 0)
        check_packing_unchanged(state, self.pack_documents)
        self.reader.seek(state["reader"])
        self.epoch = EpochState.from_saved(state["epoch"], state.get("accepted_documents", 0))
        self.reader.warn = self.epoch.passes == 0
        self.shard_documents = state["shard_documents"]
        self.pending_tokens = state["pending_tokens"].numpy().copy()
        self.pending_mask = state["pending_mask"].numpy().copy()
        self.long_document = None
        if long := state.get("long_document"):  # read it again from its start: the reader ends where it was saved
            self.reader.seek(long["reader"])
            self.long_document = LongDocument(self.reader.next_document(), long["reader"], long["characters"])
        columns = [state["buffer_tokens"], state["buffer_mask"]]
        if self.pack_documents:
            self.pending_positions = state["pending_positions"].numpy().copy()
            columns.append(state["buffer_positions"])
        self.buffer = [tuple(tensor.numpy().copy() for tensor in block) for block in zip(*columns)]
        self.rng.setstate(state["rng"])

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> "TokenBlockStream":
        worker = get_worker_info()
        if worker is not None:  # inside a DataLoader worker: this worker's share of the documents
            self.shard, self.num_shards = worker.id, worker.num_workers
        if not self.loop:
            self._reset()
            self.reader.warn = self.passes == 0
            self.passes += 1
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        """This process's next batch: (inputs, targets), and with pack_documents each input
        token's position in its document (the model restarts positions and attention there).

        Under torchrun every process reads the same rows in the same
        order (the same documents, packing and shuffle) and keeps one batch of every world_size,
        the rank-th: together the processes' batches of a round are the rows one process reads in
        world_size micro-batches, so N processes train on exactly what one process with N times
        the gradient accumulation trains on. (Each process tokenizes every document for that;
        a token cache makes it a read.)"""
        for _ in range(self.rank):
            self._skip_batch()
        batch = self._next_batch()
        for _ in range(self.world_size - 1 - self.rank):
            self._skip_batch()
        return batch

    def _skip_batch(self) -> None:
        """Read past another process's batch of this round."""
        for _ in range(self.batch_size):
            if self._next_block() is None:
                return

    def _next_batch(self) -> tuple[torch.Tensor, ...]:
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
        tokens, mask, *positions = (torch.from_numpy(np.stack(column)) for column in zip(*blocks))
        batch = (tokens[:, :-1], tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX), *(column[:, :-1] for column in positions))
        if self.one_document_per_row or self.pack_documents:
            width = trimmed_width(mask[:, 1:], self.block_size)
            batch = tuple(tensor[:, :width].contiguous() for tensor in batch)  # .view() needs them whole
        return batch

    def check_not_empty(self) -> None:
        """Read (on a fresh copy, leaving this stream untouched) until one block exists; raise
        UserInputError if none can, so a run fails at its start rather than at its first evaluation.

        Under torchrun every process reads the same data, so every one reaches the same verdict,
        and the error is the same sentence everywhere (rank 0 prints it once)."""
        probe = self._finite_copy(tokenize_batch_size=8)
        if probe._next_block() is None:
            raise probe._empty_error()
        probe.reader.close()

    def sequences_per_pass(self) -> int:
        """The rows (packed blocks, or one-document rows) one pass over the data gives, every
        shard's together: a counting pass on a fresh, unshuffled copy, leaving this stream where
        it is. It reads (and, without a token cache, tokenizes) all of this split's data once."""
        counter = self._finite_copy()
        rows = 0
        while counter._next_packed_block() is not None:
            rows += 1
        counter.reader.close()
        return rows

    def _finite_copy(self, tokenize_batch_size: int = 64) -> "TokenBlockStream":
        """A new stream over the same data, split and rows as this one, read once, in order, whole
        (every process's rows). Its reader reports no bad lines: this stream does, when it reads them."""
        copy = TokenBlockStream(
            self.sources, self.tokenizer, self.block_size, 1, split=self.split, val_fraction=self.val_fraction,
            loop=False, text_field=self.text_field, max_documents=self.max_documents,
            tokenize_batch_size=tokenize_batch_size, assistant_only_loss=self.assistant_only_loss,
            one_document_per_row=self.one_document_per_row, pack_documents=self.pack_documents,
        )
        copy.reader.warn = False
        return copy

    def _empty_error(self) -> UserInputError:
        where = ", ".join(str(source) for source in self.sources)
        shard = f" for shard {self.shard} of {self.num_shards}" if self.num_shards > 1 else ""
        block = f"one block of {self.block_size + 1} tokens"
        if self.report.no_assistant and not self.learnable_documents:
            return UserInputError(
                f"No conversation in {where}{shard} has an assistant turn: chat fine-tuning learns the assistant's replies, "
                "so give each record at least one turn with the role 'assistant'."
            )
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

    def _next_block(self) -> tuple[np.ndarray, ...] | None:
        """The next block (tokens, target mask[, positions]) of block_size + 1, through the shuffle buffer."""
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

    def _next_packed_block(self) -> tuple[np.ndarray, ...] | None:
        if self.pack_documents:
            return self._next_row_of_documents()
        length = self.block_size + 1
        while len(self.pending_tokens) < length:
            if not self._tokenize_more():
                return None
        block = (self.pending_tokens[:length].copy(), self.pending_mask[:length].copy())
        # Packed, the next block starts with this block's last token, so every token is predicted
        # once. One document per row, each row is a whole padded document: the next starts after it.
        advance = length if self.one_document_per_row else self.block_size
        self.pending_tokens = self.pending_tokens[advance:]
        self.pending_mask = self.pending_mask[advance:]
        return block

    def _next_row_of_documents(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The next row of whole documents (tokens, target mask, positions), padded to block_size + 1.

        Documents go in in the order they were read while the next one still fits (first fit in
        reading order: the stream never looks ahead past the row being filled, so its position
        stays a few arrays); each is at most a row long, cut when it was tokenized. The padding
        is a sequence of its own (positions from 0) that is never a target."""
        length = self.block_size + 1
        while len(self.pending_tokens) <= length:  # past the row's end: where the document crossing it starts is known
            if not self._tokenize_more():
                break
        if not len(self.pending_tokens):
            return None
        end = len(self.pending_tokens)
        if end > length:  # the last document that starts within the row, or right at its end, ends the row
            end = int(np.flatnonzero(self.pending_positions[1 : length + 1] == 0)[-1]) + 1
        positions = self.pending_positions[:end]
        self._count_row(documents=int((positions == 0).sum()), tokens=end)
        row = padded_row(self.pending_tokens[:end], self.pending_mask[:end], length, self.tokenizer.pad_id)
        padding = np.arange(length - end, dtype=np.int64)
        self.pending_tokens, self.pending_mask = self.pending_tokens[end:], self.pending_mask[end:]
        self.pending_positions = self.pending_positions[end:]
        return (*row, np.concatenate([positions, padding]))

    def _tokenize_more(self) -> bool:
        """Read and tokenize the next batch of documents, or the next run of a long document;
        False when a finite stream has ended."""
        if self.long_document is not None:
            return self._tokenize_long_document()
        documents = self._read_documents()
        if not documents:
            return False
        last = documents[-1]  # only the last of a batch can be this long: its text alone ends the batch
        if last.text is not None and len(last.text) > TOKENIZE_BATCH_CHARACTERS:
            self.long_document = LongDocument(documents.pop(), self.reader_position_before_last)
        token_chunks, mask_chunks, position_chunks = [self.pending_tokens], [self.pending_mask], [self.pending_positions]
        for document, (ids, assistant) in zip(documents, encode_documents(documents, self.tokenizer)):
            if self.assistant_only_loss and not assistant[:-1 if document.ends_document else None].any():
                # The assistant never speaks: its <|endoftext|> alone would be the only target.
                self.report.no_assistant += 1
                continue
            self.learnable_documents += 1
            mask = assistant if self.assistant_only_loss else np.ones(len(ids), dtype=bool)
            laid_out = self._laid_out(ids, mask)
            if laid_out is None:
                continue
            token_chunks.append(laid_out[0])
            mask_chunks.append(laid_out[1])
            position_chunks.append(laid_out[2])

        def joined(chunks: list[np.ndarray]) -> np.ndarray:
            # One chunk alone (the previous ones all packed) is kept, not copied.
            return chunks[-1] if len(chunks) == 2 and not len(chunks[0]) else np.concatenate(chunks)

        self.pending_tokens, self.pending_mask = joined(token_chunks), joined(mask_chunks)
        if self.pack_documents:
            self.pending_positions = joined(position_chunks)
        if self.long_document is not None:
            self.learnable_documents += 1  # plain text: every token is a target
            self._tokenize_long_document()
        return True

    def _tokenize_long_document(self) -> bool:
        """Add the long document's next run to the pending tokens. In chat rows (one per row or
        packed) its row is its start, cut to the block (its first run is far longer), and the
        rest is never read."""
        ids, last = self.long_document.next_run(self.tokenizer)
        if self.one_document_per_row or self.pack_documents:
            last = True
        if last:
            self.long_document = None
        laid_out = self._laid_out(ids, np.ones(len(ids), dtype=bool))
        if laid_out is not None:
            self.pending_tokens = np.concatenate([self.pending_tokens, laid_out[0]])
            self.pending_mask = np.concatenate([self.pending_mask, laid_out[1]])
            self.pending_positions = np.concatenate([self.pending_positions, laid_out[2]])
        return True

    def _laid_out(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A tokenized document ready to wait for packing: (tokens, target mask, positions in the
        document; positions are kept only when conversations are packed, else empty). Chat rows
        take it whole (`_whole_document`), one per row also padded; None when nothing is left to learn."""
        if self.one_document_per_row or self.pack_documents:
            ids, mask = self._whole_document(ids, mask)
            if ids is None:
                return None
        if self.one_document_per_row:
            self._count_row(documents=1, tokens=len(ids))
            ids, mask = padded_row(ids, mask, self.block_size + 1, self.tokenizer.pad_id)
        positions = np.arange(len(ids) if self.pack_documents else 0, dtype=np.int64)
        return ids, mask, positions

    def _count_row(self, documents: int, tokens: int) -> None:
        """For the data report: a row laid out with `documents` whole documents of `tokens` tokens in all."""
        self.report.rows += 1
        self.report.row_documents += documents
        self.report.row_tokens += tokens

    def _whole_document(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """A document for a row of its own or a share of a packed row: cut at the end if longer
        than block_size + 1 tokens (a chat's question always stays with its answer, since only
        the end is lost), its first token never a target (a row's first token is not, and in a
        packed row it would be the previous document's prediction). None for a document left
        with no target after the cut."""
        length = self.block_size + 1
        if len(ids) > length:
            ids, mask = ids[:length], mask[:length]
            self.report.truncated += 1
        if not mask[1:].any():
            self.report.dropped += 1
            return None, None
        mask = mask.copy()
        mask[0] = False
        return ids, mask

    def _read_documents(self) -> list[Document]:
        """Up to tokenize_batch_size documents of this split and shard; [] when a finite stream ends."""
        documents: list[Document] = []
        characters = 0  # a batch also ends at TOKENIZE_BATCH_CHARACTERS: long documents are not gathered by the dozen
        while len(documents) < self.tokenize_batch_size and characters < TOKENIZE_BATCH_CHARACTERS:
            capped = self.max_documents and self.epoch.position >= self.max_documents
            before = self.reader.position()
            document = None if capped else self.reader.next_document()
            if document is None:  # the end of the data, or of the cap
                if not self.loop or documents:  # a looping stream starts the next epoch on the next call, not
                    break  # within this batch (a file of one huge document would be read over and over)
                if self.shard_documents == 0:  # a whole epoch gave nothing: another would not either
                    raise self._empty_error()
                self._start_next_epoch()
                continue
            if self.split != "all" and (document_hash_fraction(document) < self.val_fraction) != (self.split == "val"):
                continue
            # DataLoader workers shard by the position among this split's documents: worker s of
            # n takes documents s, s + n, s + 2n, ...
            index = self.epoch.position
            self.epoch.position += 1
            if index % self.num_shards == self.shard:
                self.shard_documents += 1
                documents.append(document)
                self.reader_position_before_last = before
                characters += len(document.text) if document.text is not None else 0
        return documents

    def _start_next_epoch(self) -> None:
        self.epoch = EpochState(passes=self.epoch.passes + 1)
        self.shard_documents = 0
        self.reader.seek([0, 0, 0, 0, 0])
        self.reader.warn = False  # bad lines were reported in the first epoch


def holdout_filling_one_block(
    sources: Sequence, tokenizer: Tokenizer, block_size: int, val_fraction: float, text_field: str = "text",
) -> float | None:
    """The smallest hold-out fraction, at least `val_fraction`, whose documents fill one block of
    block_size + 1 tokens while the other documents still fill one too and keep at least as many
    tokens as are held out; None if the data is too small for that.

    The hold-out takes the documents whose stable hash is below the fraction, so raising the
    fraction adds whole documents in hash order: this finds where the held-out tokens first
    reach a block and puts the fraction halfway to the next document's hash. It reads and
    tokenizes every document once, so it is meant for the small data where a 1% hold-out is empty
    (one document, however long: only counts are kept, a long document's counted a run at a time).
    """
    reader = DocumentReader(list(sources), text_field)
    reader.warn = False  # the training stream reports bad lines when it reads them
    sized, counted = [], 0  # (hash, tokens) of each document; the tokens so far of the one being counted
    for documents in document_batches(reader, HOLDOUT_BATCH_DOCUMENTS):
        for document, ids, _, last in document_runs(documents, tokenizer):
            counted += len(ids)
            if last:
                sized.append((document_hash_fraction(document), counted))
                counted = 0
    sized.sort()
    needed, total, held = block_size + 1, sum(tokens for _, tokens in sized), 0
    for index, (fraction, tokens) in enumerate(sized):
        held += tokens
        if held >= needed:
            if total - held < max(needed, held):  # training keeps one block, and most of the data
                return None
            following = sized[index + 1][0] if index + 1 < len(sized) else 1.0
            return max(val_fraction, (fraction + following) / 2)
    return None


class RepeatedBatch:
    """The same batch forever (--overfit-batch): the first check when a run will not learn.

    A model that cannot drive the loss on one batch to about zero has a bug, not a data problem.
    """

    NAMES = ("inputs", "targets", "positions")  # the batch's tensors, as the stream gives them (positions: packed rows)

    def __init__(self, stream: TokenBlockStream):
        self.batch = next(iter(stream))

    def __iter__(self) -> "RepeatedBatch":
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        return self.batch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.NAMES, self.batch))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.batch = tuple(state[name] for name in self.NAMES if name in state)


class ParallelBatches:
    """Training batches read by `workers` DataLoader processes, each streaming its own share of
    the documents (the stream shards itself by worker), so tokenizing never waits in line with
    the model.

    A worker's position lives in another process, so a checkpoint records how many batches were
    consumed instead, and a resumed run replays that many: the DataLoader hands out the workers'
    batches in a fixed round-robin order, so the replay reaches exactly the same place (at the
    cost of reading the data up to it again).

    That order depends on the number of workers (each reads every n-th document), so a position
    means something only with the same number: a checkpoint records it, and resuming with
    another is refused (`worker_count_changed`). The run records the number it resolved
    `dataloader_workers = -1` to in its config.json, so a plain --resume keeps it on any device.
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
        state = {"consumed_batches": self.consumed, "workers": self.workers}
        if self.stream.pack_documents:  # the layout of the rows replayed (check_packing_unchanged)
            state["pack_documents"] = True
        return state

    def sequences_per_pass(self) -> int:
        return self.stream.sequences_per_pass()

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "consumed_batches" not in state:  # a TokenBlockStream's position: read in the main process
            raise worker_count_changed(0, self.workers)
        if state.get("workers", self.workers) != self.workers:  # checkpoints before the count was saved: trusted
            raise worker_count_changed(state["workers"], self.workers)
        check_packing_unchanged(state, self.stream.pack_documents)
        self.consumed = state["consumed_batches"]


class RecordBatches:
    """Batches of whole records held in memory (a classifier's labelled texts, preference pairs):
    the order they come in, their epochs and each process's share. A subclass makes a batch
    from the indices of its records (`_batch`).

    loop=True (training): shuffled anew each epoch (the order is drawn from `seed` and the epoch
    number, so the position is just two integers) and never ends. loop=False (evaluation): in
    order, once, starting over each time it is iterated.

    Under torchrun (`rank` of `world_size`) every process holds all the records and trains on its
    share: the epoch's order is cut in batches, the last one shorter, and the processes take them
    in turn, each its own batch of every `world_size` in a row. So 2 processes with one batch each
    see exactly the records that 1 process sees in 2 accumulated batches. The position is where
    the next round of `world_size` batches starts, the same in every process. The position counts
    records, so `batch_size` may change between batches (--batch-size auto, a memory back-off).
    """

    one_document_per_row = True  # for the trainer's data report: truncation is counted

    def __init__(self, count: int, batch_size: int, *, loop: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.count, self.batch_size = count, batch_size
        self.loop, self.seed = loop, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = EpochState()  # position: records of this pass's order already batched
        self._drawn: tuple[tuple[int, int], np.ndarray] | None = None  # ((pass, batch size), its order): drawn once a pass

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = EpochState.from_saved(state["epoch"], state.get("position", 0))
        if self.epoch.position >= self.count:  # saved at the very end of an epoch
            self.epoch = replace(self.epoch, passes=self.epoch.passes + 1, position=0)

    def sequences_per_pass(self) -> int:
        return self.count

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.count) if self.loop else np.arange(self.count)

    def _pass_order(self, epoch: int) -> np.ndarray:
        """`_order(epoch)`, drawn once per pass (and batch size, which a subclass's order may depend on), not once per batch."""
        key = (epoch, self.batch_size)
        if self._drawn is None or self._drawn[0] != key:
            self._drawn = key, self._order(epoch)
        return self._drawn[1]

    def __iter__(self) -> Iterator[Any]:
        if self.loop:
            return self._endless()
        return (self._batch(np.arange(start, min(start + self.batch_size, self.count))) for start in range(0, self.count, self.batch_size))

    def _after_batch(self, epoch: EpochState) -> EpochState:
        """Where the batch after the one starting at `epoch` starts: a pass's last batch is shorter."""
        position = epoch.position + self.batch_size
        if position >= self.count:
            return replace(epoch, passes=epoch.passes + 1, position=0)
        return replace(epoch, position=position)

    def _endless(self) -> Iterator[Any]:
        while True:
            start = self.epoch
            for _ in range(self.rank):  # the batches of the processes before this one
                start = self._after_batch(start)
            chosen = self._pass_order(start.passes)[start.position : start.position + self.batch_size]
            for _ in range(self.world_size):  # the round: this process's batch and the others'
                self.epoch = self._after_batch(self.epoch)
            yield self._batch(chosen)

    def _batch(self, chosen: np.ndarray) -> Any:
        raise NotImplementedError


def check_packing_unchanged(state: dict[str, Any], pack_documents: bool) -> None:
    """Refuse, in one sentence, to resume a chat fine-tuning stream in the other row layout than its
    checkpoint's: the saved position (tokens waiting, the shuffle buffer) and the batch order
    belong to one layout. A checkpoint from before packing existed laid out one conversation per row."""
    saved = bool(state.get("pack_documents", False))
    if saved != pack_documents:
        setting = "on" if saved else "off"
        raise UserInputError(
            f"This checkpoint's data position was saved with --packing {setting} and this run asks for --packing "
            f"{'on' if pack_documents else 'off'}: resume with --packing {setting}, since the rows and their order "
            "depend on how conversations are laid out."
        )


def worker_count_changed(saved: int | None, current: int) -> UserInputError:
    """The one sentence for a resume whose data-loader worker count differs from the checkpoint's
    (`saved` None: a checkpoint from before the count was recorded)."""
    saved_with = "data-loader workers" if saved is None else f"{saved} data-loader worker(s)"
    again = "the --dataloader-workers it was saved with" if saved is None else f"--dataloader-workers {saved}"
    return UserInputError(
        f"This checkpoint's data position was saved with {saved_with} and this run has {current}: resume with {again}, "
        "since each worker reads its own share of the documents and the batch order depends on their number."
    )
