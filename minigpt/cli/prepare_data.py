"""`minigpt prepare-data --tokenizer tokenizer.json --data-files ...`: build the token cache."""

from __future__ import annotations

import time
from pathlib import Path

from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.corpus import BUILTIN_CORPUS
from minigpt.sources import resolve_data_files
from minigpt.token_cache import build_token_cache, cache_key
from minigpt.tokenizer import load_tokenizer


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("prepare-data"),
                            description=f"Tokenize data once into a token cache that '{program_name('train')} --token-cache' reads.")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer.json the training run will use")
    add_shared_arguments(parser, "data_files", "text_field", "output_dir",
                         data_files={"help": "files, directories or globs (default: the built-in corpus)"},
                         output_dir={"help": "the folder of runs; the cache goes to its token_cache/ (default: checkpoints)"})
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    tokenizer = load_tokenizer(arguments.tokenizer)
    sources = resolve_data_files(arguments.data_files) if arguments.data_files else [BUILTIN_CORPUS]
    root = Path(arguments.output_dir) / "token_cache"
    existed = (root / cache_key(sources, tokenizer, arguments.text_field)).is_dir()
    start = time.perf_counter()
    cache = build_token_cache(sources, tokenizer, root, arguments.text_field)
    seconds = time.perf_counter() - start
    tokens = len(cache.tokens)
    how = "already built for these files and this tokenizer" if existed else f"built in {seconds:.1f} s, {tokens / seconds:,.0f} tokens/s"
    print(f"Token cache {cache.directory}: {cache.documents:,} documents, {tokens:,} tokens ({cache.tokens.dtype}); {how}.")
    print(f"Train from it with: {program_name('train')} --token-cache --tokenizer {arguments.tokenizer} "
          f"--output-dir {arguments.output_dir} --data-files {' '.join(arguments.data_files or [BUILTIN_CORPUS])}")
    return 0
