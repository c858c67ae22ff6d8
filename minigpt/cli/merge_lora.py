"""`minigpt merge-lora RUN/final_model --output DIR`: fold a LoRA adapter into its base model.

The result is an ordinary model directory (model.safetensors, config.json, tokenizer.json) with
W + (alpha/R) B A in every adapted layer: it loads, generates and exports like any other model,
with no adapter and no base model needed any more.
"""

from __future__ import annotations

from pathlib import Path

from minigpt.checkpoint import save_model_directory
from minigpt.cli.common import ArgumentParser, program_name, run_command
from minigpt.errors import UserInputError
from minigpt.lora import find_adapter, load_adapter, merge_lora


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("merge-lora"), description="Merge a LoRA adapter into its base model.")
    parser.add_argument("adapter", help="an adapter directory (holding adapter_config.json), e.g. RUN/final_model")
    parser.add_argument("--output", required=True, help="the merged model directory to write (replaced if it exists)")
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    adapter = find_adapter(arguments.adapter)
    if adapter is None:
        raise UserInputError(f"{arguments.adapter} holds no adapter_config.json; give the final_model/ of a LoRA run.")
    if Path(arguments.output).resolve() == adapter.resolve():
        raise UserInputError("--output must differ from the adapter directory, which would be overwritten.")
    model, tokenizer, run_config = load_adapter(adapter)
    merged = save_model_directory(arguments.output, merge_lora(model), run_config, tokenizer)
    print(f"Merged {adapter} into {merged}.")
    return 0
