"""`minigpt export MODEL --format hf|gguf --output DIR`: hand a model to other tools.

    --format hf     a folder transformers loads with AutoModelForCausalLM / AutoTokenizer
    --format gguf   a folder with model.gguf (llama.cpp, LM Studio) and a Modelfile (ollama create)
"""

from __future__ import annotations

from minigpt.checkpoint import load_model_directory
from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.errors import UserInputError
from minigpt.export import GGUF_OUTTYPES, export_gguf, export_hf


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("export"), description="Export a MiniGPT model for Hugging Face transformers or llama.cpp/Ollama.")
    add_shared_arguments(parser, "model")
    parser.add_argument("--format", required=True, choices=["hf", "gguf"], help="hf = transformers folder; gguf = llama.cpp file + Ollama Modelfile")
    parser.add_argument("--output", required=True, help="the folder to write (refused if it exists, unless --force)")
    parser.add_argument("--outtype", choices=GGUF_OUTTYPES, help="GGUF weight type (default f16; norms stay f32)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output")
    return parser


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.format == "hf" and arguments.outtype:
        raise UserInputError("--outtype sets GGUF weight types; a Hugging Face export is float32, so drop --outtype or use --format gguf.")
    model, tokenizer, _ = load_model_directory(arguments.model)
    if arguments.format == "hf":
        path = export_hf(model, tokenizer, arguments.output, force=arguments.force)
    else:
        path = export_gguf(model, tokenizer, arguments.output, arguments.outtype or "f16", force=arguments.force)
    print(f"Wrote {path}")
    return 0
