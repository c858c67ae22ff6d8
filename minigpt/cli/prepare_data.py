"""`python scripts/prepare_data.py --tokenizer tokenizer.json --data-files ...`: build the token cache."""

from __future__ import annotations

import time
from pathlib import Path

from minigpt.cli.common import ArgumentParser, run_command
from minigpt.corpus import BUILTIN_CORPUS
from minigpt.sources import resolve_data_files
from minigpt.token_cache import build_token_cache, cache_key
from minigpt.tokenizer import load_tokenizer


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="prepare_data.py", description="Tokenize data once into a token cache that train.py --token-cache reads.")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer.json the training run will use")
    parser.add_argument("--data-files", nargs="+", default=None, help="files, directories or globs (default: the built-in corpus)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--output-dir", default="checkpoints", help="the runs' output directory; the cache goes to its token_cache/")
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
    print(f"Train from it with: python scripts/train.py --token-cache --tokenizer {arguments.tokenizer} "
          f"--output-dir {arguments.output_dir} --data-files {' '.join(arguments.data_files or [BUILTIN_CORPUS])}")
    return 0
