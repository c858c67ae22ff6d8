"""`minigpt generate MODEL --prompt "..."`: sample text from a trained model, streamed."""

from __future__ import annotations

import argparse
import sys

from minigpt.checkpoint import load_model_directory
from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.errors import UserInputError
from minigpt.generate import SamplingConfig, stream_tokens
from minigpt.runtime import select_device
from minigpt.tokenizer import Tokenizer


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("generate"), description="Generate text from a final_model/, checkpoint or run directory.")
    add_shared_arguments(parser, "model")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for several prompts; none = start of a document)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0 = off")
    parser.add_argument("--top-p", type=float, default=0.95, help="1.0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = off; 1.1-1.3 discourages repeats")
    add_shared_arguments(parser, "seed", seed={"help": "fix the sample (default: different every time)"})
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    parser.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse each token's keys and values; --no-kv-cache recomputes the whole context every token (slower; for comparison)")
    add_shared_arguments(parser, "device")
    return parser


def check_sampling(sampling: SamplingConfig) -> None:
    if sampling.max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1, got {sampling.max_new_tokens}.")
    if sampling.temperature < 0:
        raise UserInputError(f"--temperature must not be negative, got {sampling.temperature}.")
    if sampling.top_k < 0:
        raise UserInputError(f"--top-k must not be negative, got {sampling.top_k}.")
    if not 0 < sampling.top_p <= 1:
        raise UserInputError(f"--top-p must be in (0, 1], got {sampling.top_p}.")
    if sampling.repetition_penalty <= 0:
        raise UserInputError(f"--repetition-penalty must be positive, got {sampling.repetition_penalty}.")


def print_streamed(tokenizer: Tokenizer, ids) -> None:
    """Print tokens as they come. A byte-level token can end inside a multi-byte character, so
    decode everything so far and print only the new, complete part."""
    generated: list[int] = []
    shown = ""
    for token in ids:
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(generated)[len(shown):] + "\n")


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    sampling = SamplingConfig(
        max_new_tokens=arguments.max_new_tokens, temperature=arguments.temperature, top_k=arguments.top_k,
        top_p=arguments.top_p, repetition_penalty=arguments.repetition_penalty, seed=arguments.seed,
        use_kv_cache=arguments.kv_cache,
    )
    check_sampling(sampling)
    model, tokenizer, _ = load_model_directory(arguments.model, select_device(arguments.device))
    for prompt in arguments.prompt or [""]:
        if arguments.chat:
            prompt_ids = tokenizer.chat_prompt([{"role": "user", "content": prompt}])
            sampling.stop_ids = (tokenizer.im_end_id, tokenizer.eos_id)
        else:
            prompt_ids = [tokenizer.eos_id] + tokenizer.encode(prompt)  # EOS marks "a new document starts here"
            sampling.stop_ids = (tokenizer.eos_id,)
        if len(prompt_ids) >= model.config.block_size:
            raise UserInputError(f"The prompt is {len(prompt_ids)} tokens; this model reads at most {model.config.block_size - 1}.")
        sys.stdout.write(prompt)
        print_streamed(tokenizer, stream_tokens(model, prompt_ids, sampling))
    return 0
