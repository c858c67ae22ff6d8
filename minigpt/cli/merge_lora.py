"""`minigpt merge-lora RUN/final_model --output DIR`: fold a LoRA adapter into its base model.

The result is an ordinary model directory (model.safetensors, config.json, tokenizer.json) with
W + (alpha/R) B A in every adapted layer: it loads, generates and exports like any other model,
with no adapter and no base model needed any more.
"""

from __future__ import annotations

from pathlib import Path

from minigpt.cli.common import ArgumentParser, program_name, run_command
from minigpt.errors import UserInputError
from minigpt.model_folder import FolderKind, identify, load, save_model_directory


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("merge-lora"), description="Merge a LoRA adapter into its base model.")
    parser.add_argument("adapter", help="a LoRA run's final_model/ (holding lora_adapter.json), its run directory, or a PEFT LoRA adapter folder")
    parser.add_argument("--output", required=True, help="the merged model directory to write (replaced if it exists)")
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    folder = identify(arguments.adapter)
    if folder.kind is not FolderKind.LORA_ADAPTER:
        raise UserInputError(f"{arguments.adapter} holds {folder.kind.value}, not a LoRA adapter, so there is nothing to merge; "
                             "give the final_model/ of a LoRA run.")
    if Path(arguments.output).resolve() == folder.path.resolve():
        raise UserInputError("--output must differ from the adapter directory, which would be overwritten.")
    loaded = load(folder.path)  # the adapter on its base, merged
    merged = save_model_directory(arguments.output, loaded.model, loaded.config, loaded.tokenizer)
    print(f"Merged {folder.path} into {merged}.")
    return 0
