"""`minigpt tokenizer`: train and save a tokenizer on its own."""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path

from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.config import CHOICES, TrainConfig
from minigpt.corpus import BUILTIN_CORPUS
from minigpt.sources import iter_documents, resolve_data_files
from minigpt.errors import UserInputError
from minigpt.tokenizer import choose_tokenizer_type, train_tokenizer

DEFAULTS = TrainConfig()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("tokenizer"), description="Train a BPE or character tokenizer (auto: characters for Chinese, Japanese or Korean text) and save tokenizer.json.")
    add_shared_arguments(parser, "data_files", "text_field", data_files={"help": "files, directories or globs (default: the built-in corpus)"})
    # The same names as `minigpt train`'s tokenizer flags, and the same defaults.
    parser.add_argument("--tokenizer-type", default=DEFAULTS.tokenizer_type, choices=CHOICES["train.tokenizer_type"])
    parser.add_argument("--vocab-size", type=int, default=DEFAULTS.tokenizer_vocab_size, help="BPE vocabulary size, special tokens included (default: %(default)s)")
    parser.add_argument("--tokenizer-samples", "--max-samples", type=int, default=DEFAULTS.tokenizer_samples,
                        help="train on at most this many documents (0 = all)")
    parser.add_argument("--output", default="checkpoints/tokenizer.json", help="where to write tokenizer.json (default: %(default)s)")
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.tokenizer_samples < 0:
        raise UserInputError(f"--tokenizer-samples must not be negative, got {arguments.tokenizer_samples}.")
    sources = resolve_data_files(arguments.data_files) if arguments.data_files else [BUILTIN_CORPUS]
    start = time.perf_counter()
    kind = arguments.tokenizer_type
    if kind == "auto":
        kind, share = choose_tokenizer_type(iter_documents(sources, text_field=arguments.text_field))
        print(f"{share:.0%} of the text's characters are Chinese, Japanese or Korean: training a {kind} tokenizer.")
    documents = iter_documents(sources, text_field=arguments.text_field)
    tokenizer = train_tokenizer(kind, documents, arguments.vocab_size, arguments.tokenizer_samples)
    seconds = time.perf_counter() - start
    output = Path(arguments.output)
    tokenizer.save(output)
    sample = "".join(islice(iter_documents(sources, text_field=arguments.text_field), 200))
    characters_per_token = len(sample) / max(1, len(tokenizer.encode(sample)))
    print(f"Trained a {tokenizer.kind} tokenizer of {tokenizer.vocab_size:,} tokens in {seconds:.1f} s; "
          f"{characters_per_token:.2f} characters per token on the first documents.")
    print(f"Saved {output}")
    return 0
