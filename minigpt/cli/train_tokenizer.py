"""`python scripts/train_tokenizer.py`: train and save a tokenizer on its own."""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path

from minigpt.cli.common import ArgumentParser, run_command
from minigpt.corpus import BUILTIN_CORPUS
from minigpt.sources import iter_documents, resolve_data_files
from minigpt.errors import UserInputError
from minigpt.tokenizer import train_tokenizer


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="train_tokenizer.py", description="Train a BPE or character tokenizer and save tokenizer.json.")
    parser.add_argument("--data-files", nargs="+", default=None, help="files, directories or globs (default: the built-in corpus)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--tokenizer-type", default="bpe", choices=["bpe", "char"])
    parser.add_argument("--vocab-size", type=int, default=6400, help="BPE vocabulary size, special tokens included")
    parser.add_argument("--max-samples", type=int, default=0, help="train on at most this many documents (0 = all)")
    parser.add_argument("--output", default="tokenizer.json", help="where to write tokenizer.json")
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.max_samples < 0:
        raise UserInputError(f"--max-samples must not be negative, got {arguments.max_samples}.")
    sources = resolve_data_files(arguments.data_files) if arguments.data_files else [BUILTIN_CORPUS]
    start = time.perf_counter()
    documents = iter_documents(sources, text_field=arguments.text_field)
    tokenizer = train_tokenizer(arguments.tokenizer_type, documents, arguments.vocab_size, arguments.max_samples)
    seconds = time.perf_counter() - start
    output = Path(arguments.output)
    tokenizer.save(output)
    sample = "".join(islice(iter_documents(sources, text_field=arguments.text_field), 200))
    characters_per_token = len(sample) / max(1, len(tokenizer.encode(sample)))
    print(f"Trained a {tokenizer.kind} tokenizer of {tokenizer.vocab_size:,} tokens in {seconds:.1f} s; "
          f"{characters_per_token:.2f} characters per token on the first documents.")
    print(f"Saved {output}")
    return 0
