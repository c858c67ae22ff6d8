"""`minigpt evaluate MODEL --data-files ...`: loss, perplexity and bits per byte on data."""

from __future__ import annotations

import json
import math

import torch

from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.data import TokenBlockStream
from minigpt.sources import resolve_data_files
from minigpt.errors import UserInputError
from minigpt.evaluation import evaluate
from minigpt.model_folder import load_language_model
from minigpt.runtime import select_device


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("evaluate"), description="Evaluate a model on .jsonl/.txt data.")
    add_shared_arguments(parser, "model", "data_files", "text_field", data_files={"required": True})
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=0, help="context length (default: the model's)")
    parser.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (0 = all the data)")
    add_shared_arguments(parser, "device")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    loaded = load_language_model(arguments.model, select_device(arguments.device))
    model, tokenizer = loaded.model, loaded.tokenizer
    block_size = arguments.block_size or model.config.block_size
    if not 1 <= block_size <= model.config.block_size:
        raise UserInputError(f"--block-size must be between 1 and the model's {model.config.block_size}, got {block_size}.")
    if arguments.batch_size < 1 or arguments.max_batches < 0:
        raise UserInputError("--batch-size must be at least 1 and --max-batches not negative.")
    stream = TokenBlockStream(
        resolve_data_files(arguments.data_files), tokenizer, block_size, arguments.batch_size, split="all", loop=False,
        text_field=arguments.text_field,
    )
    stream.check_not_empty()
    byte_lengths = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long)
    result = evaluate(model, stream, byte_lengths, arguments.max_batches)
    if arguments.json:
        print(json.dumps({"loss": result.loss, "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte,
                          "tokens": result.tokens, "bytes": result.bytes}))
    else:
        print(f"loss           {result.loss:.4f} nats/token")
        print(f"perplexity     {result.perplexity:.2f}")
        print(f"bits per byte  {result.bits_per_byte:.4f}")
        print(f"tokens         {result.tokens:,} ({result.bytes:,} bytes, {result.bytes / result.tokens:.2f} bytes/token)")
    return 0 if math.isfinite(result.loss) else 1
