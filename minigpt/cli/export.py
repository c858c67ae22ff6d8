"""`minigpt export MODEL --format hf|gguf|peft --output DIR`: hand a model to other tools.

    --format hf     a folder transformers loads with AutoModelForCausalLM / AutoTokenizer
    --format gguf   a folder with model.gguf (llama.cpp, LM Studio) and a Modelfile (ollama create)
    --format peft   a LoRA run's adapter alone, as PEFT saves one (adapter_config.json +
                    adapter_model.safetensors), for PeftModel.from_pretrained on the base's hf export

A LoRA run's final_model/ holds an adapter, not a model: `--format peft` exports it as it is,
`--merge` folds it into its base first (lora.merge_lora) so that hf and gguf get one plain model.
"""

from __future__ import annotations

from pathlib import Path

from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.errors import UserInputError
from minigpt.export import check_hf_export_of, export_hf, export_peft
from minigpt.gguf_file import GGUF_OUTTYPES, export_gguf
from minigpt.lora import lora_state_dict
from minigpt.model_folder import AdapterRun, FolderKind, LoadedModel, identify, is_hugging_face_folder, load, load_language_model


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("export"), description="Export a MiniGPT model for Hugging Face transformers, llama.cpp/Ollama or PEFT.")
    add_shared_arguments(parser, "model")
    parser.add_argument("--format", required=True, choices=["hf", "gguf", "peft"],
                        help="hf = transformers folder; gguf = llama.cpp file + Ollama Modelfile; peft = a LoRA run's adapter for PEFT")
    parser.add_argument("--output", required=True, help="the folder to write (refused if it exists, unless --force and an earlier export wrote it)")
    parser.add_argument("--outtype", choices=GGUF_OUTTYPES, help="GGUF weight type (default f16; norms stay f32; q5_0 and q4_0 keep the embedding and output head q8_0)")
    parser.add_argument("--merge", action="store_true", help="for a LoRA adapter: fold it into its base model and export the merged model (hf, gguf)")
    parser.add_argument("--hf-base", metavar="DIR",
                        help="with --format peft: the base model's --format hf export, checked and recorded as base_model_name_or_path "
                             "(default: the base's own folder if it is a Hugging Face folder, else none)")
    parser.add_argument("--force", action="store_true", help="replace an --output that an earlier export wrote (never anything else)")
    return parser


def recorded_base(hf_base: str | None, adapter: AdapterRun) -> str | None:
    """What the PEFT adapter records as base_model_name_or_path: --hf-base once it is checked to
    hold the adapter's base, else the base's own folder if transformers can load it, else None."""
    if hf_base:
        if not is_hugging_face_folder(hf_base):
            raise UserInputError(f"{hf_base} is not a Hugging Face model folder; export the base model with --format hf and name that folder.")
        exported, base = load(hf_base), load(adapter.base_path)
        check_hf_export_of(hf_base, exported.model, exported.tokenizer, base.model, base.tokenizer)
        return str(Path(hf_base).resolve())  # absolute, like the MiniGPT base path the adapter records
    if identify(adapter.base_path).kind is FolderKind.HUGGING_FACE:  # a LoRA on an imported Hugging Face model: that folder is the base
        return adapter.base_path
    return None


def hugging_face_origin(loaded: LoadedModel) -> Path | None:
    """The Hugging Face folder the model's weights came from (the folder itself, or an adapter's
    base), whose tokenizer files and chat template an hf export keeps; None for a MiniGPT model."""
    if loaded.kind is FolderKind.HUGGING_FACE:
        return loaded.source
    if loaded.adapter is not None and identify(loaded.adapter.base_path).kind is FolderKind.HUGGING_FACE:
        return Path(loaded.adapter.base_path)
    return None


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.format != "gguf" and arguments.outtype:
        raise UserInputError(f"--outtype sets GGUF weight types and a --format {arguments.format} export is float32, so drop --outtype or use --format gguf.")
    if arguments.format != "peft" and arguments.hf_base:
        raise UserInputError("--hf-base names the base of a PEFT adapter, so it needs --format peft; drop it for hf and gguf.")
    if arguments.format == "peft" and arguments.merge:
        raise UserInputError("--format peft exports the adapter alone, unmerged; drop --merge, or use --merge with --format hf or gguf.")
    # Unmerged for --format peft (the adapter's own matrices are exported); merged for hf and gguf.
    loaded = load_language_model(arguments.model, merge_adapter=arguments.format != "peft")
    is_adapter = loaded.kind is FolderKind.LORA_ADAPTER
    sources = [loaded.source, *([loaded.adapter.base_path] if is_adapter else [])]  # --force never replaces these
    if arguments.format == "peft":
        if not is_adapter:
            raise UserInputError(f"{arguments.model} holds {loaded.kind.value}, not a LoRA adapter, so there is nothing to export for PEFT; "
                                 "give a LoRA run's final_model/, or export a whole model with --format hf or gguf.")
        lora = loaded.adapter.config
        path = export_peft(lora_state_dict(loaded.model), loaded.model.config, lora.alpha, lora.dropout, arguments.output,
                           base_model_name_or_path=recorded_base(arguments.hf_base, loaded.adapter), force=arguments.force,
                           sources=sources)
        print(f"Wrote {path}")
        return 0
    if is_adapter and not arguments.merge:
        raise UserInputError(f"{loaded.source} is a LoRA adapter, not a whole model: pass --merge to export it merged into its base, "
                             "or use --format peft to export the adapter alone.")
    if not is_adapter and arguments.merge:
        raise UserInputError(f"--merge folds a LoRA adapter into its base model, but {arguments.model} holds no adapter; drop --merge.")
    if arguments.format == "hf":
        path = export_hf(loaded.model, loaded.tokenizer, arguments.output, force=arguments.force, sources=sources,
                         hf_source=hugging_face_origin(loaded))
    else:
        path = export_gguf(loaded.model, loaded.tokenizer, arguments.output, arguments.outtype or "f16", force=arguments.force,
                           sources=sources)
    print(f"Wrote {path}")
    return 0
