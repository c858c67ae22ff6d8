"""What the commands that generate text share: the sampling flags, checked."""

from __future__ import annotations

import argparse

from minigpt.cli.common import add_shared_arguments
from minigpt.errors import UserInputError
from minigpt.generation import SamplingConfig


def add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int = 200) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --repetition-penalty, --seed, --stop, --kv-cache/--no-kv-cache."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0 = off")
    parser.add_argument("--top-p", type=float, default=0.95, help="1.0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = off; 1.1-1.3 discourages repeats")
    add_shared_arguments(parser, "seed", seed={"help": "fix the sample (default: different every time)"})
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the text before this string (repeat for several)")
    parser.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse each token's keys and values; --no-kv-cache recomputes the whole context every token (slower; for comparison)")


def sampling_from_arguments(arguments: argparse.Namespace) -> SamplingConfig:
    """The SamplingConfig the flags of `add_sampling_flags` describe, checked. (--stop and
    --kv-cache are read by the commands themselves: they belong to the text and the engine.)"""
    sampling = SamplingConfig(
        max_new_tokens=arguments.max_new_tokens, temperature=arguments.temperature, top_k=arguments.top_k,
        top_p=arguments.top_p, repetition_penalty=arguments.repetition_penalty, seed=arguments.seed,
    )
    if sampling.max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1, got {sampling.max_new_tokens}.")
    if sampling.temperature < 0:
        raise UserInputError(f"--temperature must not be negative, got {sampling.temperature}.")
    if sampling.top_k < 0:
        raise UserInputError(f"--top-k must not be negative, got {sampling.top_k}.")
    if not 0 < sampling.top_p <= 1:
        raise UserInputError(f"--top-p must be in (0, 1], got {sampling.top_p}.")
    if "" in arguments.stop:
        raise UserInputError("--stop needs a non-empty text.")
    if sampling.repetition_penalty <= 0:
        raise UserInputError(f"--repetition-penalty must be positive, got {sampling.repetition_penalty}.")
    return sampling

