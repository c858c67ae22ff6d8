"""The pre-tokenized token cache: tokenize the data once, train on it many times.

On a CPU, tokenizing on the fly costs little next to the model. A GPU trains thousands of times
faster, and would wait on the tokenizer: so `scripts/prepare_data.py` (or `train.py
--token-cache`) writes the token ids of every document to disk once, and training reads them
back through a memory map (the operating system pages them in; memory stays flat).

A cache is a directory named by a key of the tokenizer and the sources (their paths, sizes and
modification times), so a changed tokenizer or a changed file gets a new cache instead of stale
tokens. It is written atomically (a temporary directory, renamed when complete):
    tokens.bin          every document's ids one after another (uint16 when the vocabulary fits)
    offsets.npy         document i is tokens[offsets[i]:offsets[i + 1]], <|endoftext|> included
    hash_fractions.npy  each document's stable hash in [0, 1), for the validation hold-out
    index.json          the key, the dtype and the counts
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from minigpt.checkpoint import write_directory_atomically
from minigpt.errors import UserInputError
from minigpt.tokenizer import Tokenizer

CACHE_VERSION = 1
ENCODE_BATCH = 256  # documents tokenized together


@dataclass
class TokenCache:
    """An opened cache: read-only arrays over the files."""

    directory: Path
    tokens: np.ndarray
    offsets: np.ndarray
    hash_fractions: np.ndarray

    @classmethod
    def open(cls, directory: str | Path) -> "TokenCache":
        directory = Path(directory)
        try:
            index = json.loads((directory / "index.json").read_text())
            tokens = np.memmap(directory / "tokens.bin", dtype=index["dtype"], mode="r", shape=(index["tokens"],)) if index["tokens"] else np.zeros(0, dtype=index["dtype"])
            offsets = np.load(directory / "offsets.npy")
            hash_fractions = np.load(directory / "hash_fractions.npy")
        except (OSError, ValueError, KeyError) as error:
            raise UserInputError(f"Token cache {directory} is unreadable ({error}); delete it to have it rebuilt.") from None
        return cls(directory, tokens, offsets, hash_fractions)

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, index: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[index] : self.offsets[index + 1]], dtype=np.int64)

    def __str__(self) -> str:
        return f"token cache {self.directory}"


def cache_key(sources: Sequence, tokenizer: Tokenizer, text_field: str) -> str:
    """Changes whenever the tokens could: another tokenizer, another file, or a file changed."""
    from minigpt.data import sources_fingerprint

    content = json.dumps([CACHE_VERSION, tokenizer.backend.to_str(), sources_fingerprint(sources), text_field])
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def build_token_cache(
    sources: Sequence, tokenizer: Tokenizer, root: str | Path, text_field: str = "text", show_progress: bool = True
) -> TokenCache:
    """Open the cache of these sources and tokenizer under `root`, building it first if needed."""
    from minigpt.data import Document, DocumentReader, document_hash_fraction

    directory = Path(root) / cache_key(sources, tokenizer, text_field)
    if (directory / "index.json").is_file():
        return TokenCache.open(directory)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    def fill(temporary: Path) -> None:
        reader = DocumentReader(list(sources), text_field)
        offsets, fractions = [0], []
        start = time.perf_counter()
        with open(temporary / "tokens.bin", "wb") as file, tqdm(unit="doc", desc="token cache", disable=not show_progress) as bar:
            while True:
                batch: list[Document] = []
                while len(batch) < ENCODE_BATCH and (document := reader.next_document()) is not None:
                    batch.append(document)
                if not batch:
                    break
                texts = [document.text if document.text is not None else "" for document in batch]
                for document, ids in zip(batch, tokenizer.encode_batch(texts)):
                    if document.conversations is not None:
                        ids, _ = tokenizer.render_chat(document.conversations)
                    if document.ends_document:
                        ids = ids + [tokenizer.eos_id]
                    file.write(np.asarray(ids, dtype=dtype).tobytes())
                    offsets.append(offsets[-1] + len(ids))
                    fractions.append(document_hash_fraction(document))
                bar.update(len(batch))
        np.save(temporary / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        np.save(temporary / "hash_fractions.npy", np.asarray(fractions, dtype=np.float64))
        (temporary / "index.json").write_text(json.dumps({
            "version": CACHE_VERSION, "dtype": np.dtype(dtype).name, "tokens": offsets[-1], "documents": len(fractions),
            "vocab_size": tokenizer.vocab_size, "sources": [str(source) for source in sources], "text_field": text_field,
            "build_seconds": time.perf_counter() - start,
        }, indent=2))

    write_directory_atomically(directory, fill)
    return TokenCache.open(directory)
