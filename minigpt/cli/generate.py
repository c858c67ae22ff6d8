"""`minigpt generate MODEL --prompt "..."`: sample text from a trained model, streamed."""

from __future__ import annotations

import sys

from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.cli.sampling import add_sampling_flags, sampling_from_arguments
from minigpt.errors import UserInputError
from minigpt.generation import print_streamed, stream_tokens
from minigpt.model_folder import load_language_model
from minigpt.runtime import select_device


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("generate"), description="Generate text from a language model: a final_model/, checkpoint, run directory or Hugging Face folder.")
    add_shared_arguments(parser, "model")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for several prompts; none = start of a document)")
    add_sampling_flags(parser)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    add_shared_arguments(parser, "device")
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    sampling = sampling_from_arguments(arguments)
    loaded = load_language_model(arguments.model, select_device(arguments.device))
    model, tokenizer = loaded.model, loaded.tokenizer
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
