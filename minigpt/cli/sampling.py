"""What the commands that generate text share: the sampling flags, checked.

--temperature, --top-k, --top-p and --repetition-penalty are unset unless given: a value the user
types always wins; one left out takes the model's own default (a pretrained folder's
generation_config.json, `Tokenizer.sampling_defaults`), else MiniGPT's (DEFAULT_SAMPLING).
"""

from __future__ import annotations

import argparse
from typing import Mapping

from minigpt.cli.common import add_shared_arguments
from minigpt.errors import UserInputError
from minigpt.generation import DEFAULT_SAMPLING, SamplingConfig

MODEL_DEFAULT = "default: the model's generation_config.json, else {}"


def add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int = 200) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --repetition-penalty, --seed, --stop, --kv-cache/--no-kv-cache."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (" + MODEL_DEFAULT.format(DEFAULT_SAMPLING["temperature"]) + ")")
    parser.add_argument("--top-k", type=int, default=None, help="0 = off (" + MODEL_DEFAULT.format(DEFAULT_SAMPLING["top_k"]) + ")")
    parser.add_argument("--top-p", type=float, default=None, help="1.0 = off (" + MODEL_DEFAULT.format(DEFAULT_SAMPLING["top_p"]) + ")")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="1.0 = off; 1.1-1.3 discourages repeats (" + MODEL_DEFAULT.format(DEFAULT_SAMPLING["repetition_penalty"]) + ")")
    add_shared_arguments(parser, "seed", seed={"help": "fix the sample (default: different every time)"})
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the text before this string (repeat for several)")
    parser.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse each token's keys and values; --no-kv-cache recomputes the whole context every token (slower; for comparison)")


def sampling_from_arguments(arguments: argparse.Namespace, model_defaults: Mapping[str, float] | None = None) -> SamplingConfig:
    """The SamplingConfig the flags of `add_sampling_flags` describe, checked: each flag given, else
    the model's default in `model_defaults`, else MiniGPT's. (--stop and --kv-cache are read by the
    commands themselves: they belong to the text and the engine.) Commands call it once before
    loading the model, so a bad flag is refused at once, and again with the model's defaults."""
    model_defaults = model_defaults or {}
    chosen, origin = {}, {}
    for key, fallback in DEFAULT_SAMPLING.items():
        flag = "--" + key.replace("_", "-")
        given = getattr(arguments, key)
        if given is not None:
            chosen[key], origin[key] = given, flag
        else:
            chosen[key] = model_defaults.get(key, fallback)
            origin[key] = f"{key} in the model's generation_config.json (override it with {flag})" if key in model_defaults else flag
    sampling = SamplingConfig(max_new_tokens=arguments.max_new_tokens, seed=arguments.seed, temperature=float(chosen["temperature"]),
                              top_k=int(chosen["top_k"]), top_p=float(chosen["top_p"]), repetition_penalty=float(chosen["repetition_penalty"]))
    if sampling.max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1, got {sampling.max_new_tokens}.")
    if sampling.temperature < 0:
        raise UserInputError(f"{origin['temperature']} must not be negative, got {sampling.temperature}.")
    if sampling.top_k < 0:
        raise UserInputError(f"{origin['top_k']} must not be negative, got {sampling.top_k}.")
    if not 0 < sampling.top_p <= 1:
        raise UserInputError(f"{origin['top_p']} must be in (0, 1], got {sampling.top_p}.")
    if "" in arguments.stop:
        raise UserInputError("--stop needs a non-empty text.")
    if sampling.repetition_penalty <= 0:
        raise UserInputError(f"{origin['repetition_penalty']} must be positive, got {sampling.repetition_penalty}.")
    return sampling
