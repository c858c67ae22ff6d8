"""`minigpt generate MODEL --prompt "..."`: sample text from a trained model, streamed.

Several --prompt flags are decoded together, as one batch on one engine (faster than one after
another: each step runs all the rows through the model at once). They are printed in order:
the first prompt's text streams as it is sampled, and each later one follows when the one
before it is done, with what it wrote meanwhile appearing at once.
"""

from __future__ import annotations

import sys

from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.cli.sampling import add_sampling_flags, sampling_from_arguments
from minigpt.engine import Engine, Request
from minigpt.errors import UserInputError
from minigpt.generation import stream_text
from minigpt.model_folder import load_language_model
from minigpt.runtime import select_device


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("generate"), description="Generate text from a language model: a final_model/, checkpoint, run directory or Hugging Face folder.")
    add_shared_arguments(parser, "model")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for several prompts, decoded together; none = start of a document)")
    add_sampling_flags(parser)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decoding step (tens of seconds first, then about twice the tokens/s on a CPU: for long outputs)")
    add_shared_arguments(parser, "device")
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    sampling_from_arguments(arguments)  # a bad flag is refused before the model loads
    if arguments.compile and not arguments.kv_cache:
        raise UserInputError("--compile compiles the KV-cache decoding step: drop --no-kv-cache to use it.")
    loaded = load_language_model(arguments.model, select_device(arguments.device))
    model, tokenizer = loaded.model, loaded.tokenizer
    sampling = sampling_from_arguments(arguments, tokenizer.sampling_defaults)
    sampling.stop_ids = tokenizer.stop_ids(chat=arguments.chat)
    prompts = arguments.prompt or [""]
    requests = []
    for prompt in prompts:
        if arguments.chat:
            prompt_ids = tokenizer.chat_prompt([{"role": "user", "content": prompt}])
        else:
            prompt_ids = tokenizer.encode_prompt(prompt)  # a new document: after <|endoftext|>, or the folder's BOS
        requests.append(Request(prompt_ids, sampling))
    engine = Engine(model, use_kv_cache=arguments.kv_cache, compile=arguments.compile)
    started = -1
    for piece in stream_text(engine, tokenizer, requests, arguments.stop):
        if piece.index != started:  # a prompt's first piece: show the prompt before its continuation
            started = piece.index
            sys.stdout.write(prompts[piece.index])
        sys.stdout.write(piece.text + ("\n" if piece.finish else ""))
        sys.stdout.flush()
    return 0
