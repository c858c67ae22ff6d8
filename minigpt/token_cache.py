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
    assistant_mask.bin  one byte per token, True where the assistant speaks (only when there is chat data)
    hash_fractions.npy  each document's stable hash in [0, 1), for the validation hold-out
    index.json          the key, the dtype and the counts
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm  # a widget in Jupyter, text in a terminal

from minigpt.files import write_directory_atomically
from minigpt.sources import DocumentReader, TokenCache, document_batches, document_hash_fraction, document_runs, sources_fingerprint
from minigpt.tokenizer import Tokenizer

CACHE_VERSION = 2  # 2: assistant masks of chat documents are kept
ENCODE_BATCH = 256  # documents tokenized together (or TOKENIZE_BATCH_CHARACTERS of text)


def cache_key(sources: Sequence, tokenizer: Tokenizer, text_field: str) -> str:
    """Changes whenever the tokens could: another tokenizer, another file, or a file changed."""
    content = json.dumps([CACHE_VERSION, tokenizer.definition(), sources_fingerprint(sources), text_field])
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def build_token_cache(
    sources: Sequence, tokenizer: Tokenizer, root: str | Path, text_field: str = "text", show_progress: bool = True
) -> TokenCache:
    """Open the cache of these sources and tokenizer under `root`, building it first if needed."""
    directory = Path(root) / cache_key(sources, tokenizer, text_field)
    if (directory / "index.json").is_file():
        return TokenCache.open(directory)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    def fill(temporary: Path) -> None:
        reader = DocumentReader(list(sources), text_field)
        offsets, fractions, has_chat = [0], [], False
        written = 0  # tokens written, of every document so far
        start = time.perf_counter()
        with open(temporary / "tokens.bin", "wb") as tokens_file, open(temporary / "assistant_mask.bin", "wb") as mask_file, \
                tqdm(unit="doc", desc="token cache", disable=not show_progress) as bar:
            for batch in document_batches(reader, ENCODE_BATCH):
                # A long document comes a run at a time (a 200 MB line: a million characters' ids at once)
                for document, ids, mask, last in document_runs(batch, tokenizer):
                    tokens_file.write(ids.astype(dtype).tobytes())
                    mask_file.write(mask.astype(np.bool_).tobytes())
                    written += len(ids)
                    if last:
                        has_chat = has_chat or document.conversations is not None
                        offsets.append(written)
                        fractions.append(document_hash_fraction(document))
                bar.update(len(batch))
        if not has_chat:  # all True: not worth a byte per token
            (temporary / "assistant_mask.bin").unlink()
        np.save(temporary / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        np.save(temporary / "hash_fractions.npy", np.asarray(fractions, dtype=np.float64))
        (temporary / "index.json").write_text(json.dumps({
            "version": CACHE_VERSION, "dtype": np.dtype(dtype).name, "tokens": offsets[-1], "documents": len(fractions),
            "has_chat": has_chat, "vocab_size": tokenizer.vocab_size, "sources": [str(source) for source in sources],
            "text_field": text_field, "build_seconds": time.perf_counter() - start,
        }, indent=2))

    write_directory_atomically(directory, fill)
    return TokenCache.open(directory)
