"""MiniGPT <-> the outside world: Hugging Face `transformers` folders and PEFT adapters.

MiniGPT's decoder has Llama's layout (RMSNorm, rotary, grouped-query attention, SwiGLU, no
biases), and the pretrained families it loads are switches on it, so moving weights in and out is
mostly *renaming tensors*. One table (`minigpt.families.tensor_table`) lists every MiniGPT tensor
with its Hugging Face name, its GGUF (llama.cpp) name and its shape; export reads the table one
way, loading a Hugging Face folder (minigpt.families.load_model) the other, and every tensor's
shape is asserted on the way. (A GGUF file is written by minigpt.gguf_file.)

    export_hf(...)      a folder `transformers.AutoModelForCausalLM` / `AutoTokenizer` load as is:
                        the model's own family (LlamaForCausalLM for MiniGPT's models)
    export_peft(...)    a LoRA adapter as PEFT saves one, for `peft.PeftModel.from_pretrained`

Two details are worth knowing:

* Tied embeddings. MiniGPT reads tokens and writes them with the same matrix. Hugging Face says
  so with `"tie_word_embeddings": true` and stores the matrix once (as the embedding); llama.cpp
  falls back to `token_embd.weight` when a file has no `output.weight`. Either way, no copy.
* Rotary layout. MiniGPT and Hugging Face rotate channel i of a head together with channel
  i + head_dim/2 ("rotate half"), so the Hugging Face export needs no permutation and a LoRA
  adapter's matrices go to PEFT as they are. (llama.cpp's `llama` architecture rotates
  neighbours: minigpt.gguf_file permutes q and k rows for it, in a merged model.)

`transformers` and `gguf` are optional packages (`pip install -e ".[export]"`): they are
imported inside the functions that need them, so MiniGPT itself runs without them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from minigpt.config import ModelConfig
from minigpt.errors import UserInputError
from minigpt.families import TensorName, checked, hugging_face_config, tensor_table
from minigpt.files import write_directory_atomically
from minigpt.lora import LORA_TARGETS, LoRAConfig
from minigpt.model import GPT
from minigpt.version import __version__
from minigpt.tokenizer import EOS_TOKEN, IM_END_TOKEN, IM_START_TOKEN, PAD_TOKEN, UNKNOWN_TOKEN, Tokenizer


# The ChatML template MiniGPT's Tokenizer.render_chat / chat_prompt follow, in Jinja (for
# transformers' apply_chat_template and llama.cpp) and in Go templates (for Ollama).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + IM_START_TOKEN + "' + message['role'] + '\\n' + message['content'] + '" + IM_END_TOKEN + "' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START_TOKEN + "assistant\\n' }}{% endif %}"
)
OLLAMA_TEMPLATE = (
    "{{- range .Messages }}" + IM_START_TOKEN + "{{ .Role }}\n{{ .Content }}" + IM_END_TOKEN + "\n{{ end }}"
    + IM_START_TOKEN + "assistant\n"
)


def _minigpt_tensors(model: GPT) -> list[tuple[TensorName, torch.Tensor]]:
    """(table row, float tensor on the CPU) for every stored tensor of `model`, shapes asserted."""
    state = model.state_dict()
    return [(row, checked(state[row.minigpt].detach().cpu().contiguous(), row, "MiniGPT model")) for row in tensor_table(model.config)]


# Every export writes this file into its folder, so that --force can tell a folder an earlier
# export wrote (which it may replace) from anything else (which it must never delete).
EXPORT_MARKER = ".minigpt-export.json"


def _check_output(output: Path, force: bool, sources: Sequence[str | Path]) -> None:
    """Refuse, in one sentence, an --output that exists, unless --force is given and it is a folder
    an earlier export wrote. Even with --force, never a file, never the folder holding the model
    being exported (`sources`: the model's folder, an adapter's base) or one above it, and never
    the current directory or one of its parents."""
    if not output.exists() and not output.is_symlink():
        return
    if not force:
        raise UserInputError(f"Output {output} already exists; choose another --output or pass --force to replace an earlier export.")
    resolved = output.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UserInputError(f"--output {output} is the current directory or one of its parents, which --force never replaces; "
                             "give the export a folder of its own.")
    if output.is_symlink() or not output.is_dir():
        raise UserInputError(f"--output {output} is a file, and --force replaces only a folder an earlier export wrote; "
                             "choose another --output.")
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise UserInputError(f"--output {output} holds the model being exported ({source}), which --force never replaces; "
                                 "choose an --output outside it.")
    if not (output / EXPORT_MARKER).is_file():
        raise UserInputError(f"--output {output} was not written by minigpt export (it has no {EXPORT_MARKER}), so --force will not "
                             "delete it; choose another --output, or remove that folder yourself if you mean to.")


def _write_export_marker(directory: Path, export_format: str) -> None:
    _write_json(directory / EXPORT_MARKER, {"format": export_format, "minigpt_version": __version__})


# ----------------------------------------------------------------------------- Hugging Face


def hf_config(config: ModelConfig, tokenizer: Tokenizer) -> dict:
    """config.json of a MiniGPT model: its family's architecture (`families.hugging_face_config`;
    a MiniGPT model is a `LlamaForCausalLM`) with MiniGPT's tokenizer's special token ids."""
    return {
        **hugging_face_config(config),
        # A MiniGPT document starts after <|endoftext|> and ends with it, so it is BOS and EOS both.
        "bos_token_id": tokenizer.eos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
    }


def hf_tokenizer_config(tokenizer: Tokenizer, block_size: int) -> dict:
    """tokenizer_config.json: the special tokens, the chat template, and no extra tokens added."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNKNOWN_TOKEN if tokenizer.kind == "char" else None,
        "add_bos_token": False,  # MiniGPT's encode adds nothing around a text
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        "model_max_length": block_size,
        "chat_template": CHAT_TEMPLATE,
    }


# What a Hugging Face folder holds besides its weights and config.json: its tokenizer, chat
# template and generation settings. Exporting a model that came from such a folder copies them.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json")
HF_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def export_hf(model: GPT, tokenizer: Tokenizer, output: str | Path, force: bool = False, sources: Sequence[str | Path] = (),
              hf_source: str | Path | None = None) -> Path:
    """Write a Hugging Face folder of the model's family (weights, config, tokenizer, chat template).

    A model loaded from a Hugging Face folder (`hf_source`: that folder, or an adapter's base
    folder) keeps its tokenizer files, chat template, generation settings and special token ids,
    copied from there; a MiniGPT model gets MiniGPT's (ChatML). `force` replaces an earlier
    export there; `sources` are the folders the model came from (never replaced).
    """
    output = Path(output)
    _check_output(output, force, sources)
    config = model.config
    # Tied: the embedding is stored once and transformers ties lm_head to it on load.
    tensors = {row.hf: tensor.float().clone() for row, tensor in _minigpt_tensors(model)}
    hf_source = Path(hf_source) if hf_source is not None else None
    config_json = hf_config(config, tokenizer)
    if hf_source is not None:
        source_config = json.loads((hf_source / "config.json").read_text(encoding="utf-8"))
        config_json.update({key: source_config.get(key) for key in HF_TOKEN_IDS})

    def fill(directory: Path) -> None:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        _write_json(directory / "config.json", config_json)
        if hf_source is not None:
            for name in HF_TOKENIZER_FILES:
                if (hf_source / name).is_file():
                    shutil.copyfile(hf_source / name, directory / name)
        else:
            _write_json(directory / "generation_config.json", {
                "bos_token_id": tokenizer.eos_id,
                "eos_token_id": [tokenizer.eos_id, tokenizer.im_end_id],  # stop at a document's or a chat turn's end
                "pad_token_id": tokenizer.pad_id,
            })
            tokenizer.save(directory / "tokenizer.json")
            _write_json(directory / "tokenizer_config.json", hf_tokenizer_config(tokenizer, config.block_size))
            (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        _write_export_marker(directory, "hf")

    return write_directory_atomically(output, fill)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def check_hf_export_of(folder: str | Path, exported: GPT, exported_tokenizer: Tokenizer, model: GPT, tokenizer: Tokenizer) -> None:
    """Refuse, in one sentence, a Hugging Face folder (imported as `exported` and `exported_tokenizer`)
    that is not an export of exactly `model` (same configuration, bit-identical weights): the base a
    PEFT adapter is recorded against."""
    ours, theirs = model.state_dict(), exported.state_dict()
    same = hf_config(model.config, tokenizer) == hf_config(exported.config, exported_tokenizer) and all(
        ours[name].shape == theirs[name].shape and torch.equal(ours[name].cpu(), theirs[name].cpu()) for name in ours
    )
    if not same:
        raise UserInputError(f"{folder} does not hold the adapter's base model; export that base with --format hf and name its folder.")


# ----------------------------------------------------------------------------- PEFT (LoRA adapters)

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def peft_tensor_name(hf_name: str, matrix: str) -> str:
    """PEFT's saved name of a LoRA matrix ("lora_A" or "lora_B") on the Hugging Face weight `hf_name`:
    `model.layers.0.self_attn.q_proj.weight` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
    (`base_model.model.` is the PeftModel and its LoraModel wrapped around the LlamaForCausalLM)."""
    return f"base_model.model.{hf_name.removesuffix('.weight')}.{matrix}.weight"


def peft_adapter_config(rank: int, alpha: float, dropout: float, target_modules: list[str], base_model_name_or_path: str | None) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA on a causal language model.

    Every field that changes what the adapter computes is written out rather than left to PEFT's
    defaults: the update is (lora_alpha / r) B A on each target's input (no rsLoRA scaling, no
    DoRA, no biases, weights stored (out, in) as nn.Linear keeps them), on every layer.
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def peft_tensors(adapter_weights: dict[str, torch.Tensor], config: ModelConfig) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """(PEFT-named tensors, rank, target module names) for MiniGPT adapter weights named as in
    `lora.lora_state_dict` (`blocks.0.attention.q_proj.lora_A.weight`), shapes checked against the table."""
    tensors, ranks, targets, unused = {}, set(), set(), set(adapter_weights)
    for row in tensor_table(config):
        prefix = row.minigpt.removesuffix(".weight")
        names = {matrix: f"{prefix}.{matrix}.weight" for matrix in ("lora_A", "lora_B")}
        if not any(name in adapter_weights for name in names.values()):
            continue
        if not all(name in adapter_weights for name in names.values()):
            raise UserInputError(f"The adapter has only one of the two LoRA matrices of {prefix}; train the adapter again.")
        down, up = adapter_weights[names["lora_A"]], adapter_weights[names["lora_B"]]
        rank = down.shape[0]
        if tuple(down.shape) != (rank, row.shape[1]) or tuple(up.shape) != (row.shape[0], rank):
            raise UserInputError(
                f"The adapter of {prefix} has shapes {tuple(down.shape)} and {tuple(up.shape)}, which do not fit its "
                f"{row.shape} weight; was it trained on another base model?"
            )
        ranks.add(rank)
        targets.add(row.hf.split(".")[-2])  # q_proj, gate_proj, ...: the module name PEFT matches
        unused -= set(names.values())
        tensors[peft_tensor_name(row.hf, "lora_A")] = down.float().contiguous()
        tensors[peft_tensor_name(row.hf, "lora_B")] = up.float().contiguous()
    if unused or len(ranks) != 1:
        raise UserInputError(f"The adapter's weights do not fit a LoRA on this model (unexpected {sorted(unused)[:2]}, ranks {sorted(ranks)}).")
    return tensors, ranks.pop(), sorted(targets)


# What PEFT's adapter_config.json may ask for that MiniGPT's LoRA does not compute, with the value
# that asks for nothing: a folder setting any other value is refused rather than run differently.
PEFT_SETTINGS_MINIGPT_LACKS = {
    "use_rslora": False, "use_dora": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
    "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
}


def lora_config_from_peft(record: dict, source: str) -> tuple[LoRAConfig, str]:
    """(MiniGPT's LoRAConfig, the base model's folder) of a PEFT adapter_config.json (`record`).

    PEFT names its targets by module (q_proj, ..., "all-linear", or modules' paths, which must
    then cover every layer); MiniGPT's short names (q, ...) name the same modules. Refused in one sentence: another adapter type, a base that is not a
    local folder (MiniGPT never downloads), and settings MiniGPT's LoRA does not compute.
    """
    if record.get("peft_type") != "LORA" or record.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserInputError(f"{source} is a {record.get('peft_type')} adapter for {record.get('task_type')}; "
                             "MiniGPT loads LoRA adapters on causal language models.")
    different = {key: record[key] for key, plain in PEFT_SETTINGS_MINIGPT_LACKS.items() if record.get(key, plain) not in (plain, None)}
    if different:
        raise UserInputError(f"{source} sets {different}, which MiniGPT's LoRA does not compute; merge the adapter with PEFT "
                             "(merge_and_unload) and load the merged folder instead.")
    short_names = {module: short for short, module in LORA_TARGETS.items()}
    modules = record.get("target_modules")
    if modules == "all-linear":
        modules = list(short_names)
    elif isinstance(modules, list):  # PEFT matches a module by its name or by its path's end (it saves all-linear as paths)
        modules = sorted({module.rpartition(".")[2] for module in modules})
    if isinstance(modules, str) or not modules or set(modules) - set(short_names):
        raise UserInputError(f"{source} targets {modules}; MiniGPT's LoRA goes on {', '.join(short_names)} (a list, or all-linear).")
    base = record.get("base_model_name_or_path") or ""
    if not Path(base).is_dir():
        raise UserInputError(f"{source} names its base model '{base}', which is not a folder here, and MiniGPT never downloads; "
                             "download the base (huggingface-cli download) and write its folder into base_model_name_or_path.")
    config = LoRAConfig(rank=record["r"], alpha=float(record["lora_alpha"]), dropout=float(record.get("lora_dropout") or 0.0),
                        targets=tuple(short_names[module] for module in sorted(modules)))
    return config, base


def lora_weights_from_peft(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA matrices (`peft_tensor_name`) under MiniGPT's names (`lora.lora_state_dict`'s),
    read through the same table that export writes them with; a name that fits no weight is refused."""
    renamed = {}
    for row in tensor_table(config):
        for matrix in ("lora_A", "lora_B"):
            if (name := peft_tensor_name(row.hf, matrix)) in tensors:
                renamed[f"{row.minigpt.removesuffix('.weight')}.{matrix}.weight"] = tensors[name]
    if len(renamed) != len(tensors):
        unknown = sorted(set(tensors) - {peft_tensor_name(row.hf, matrix) for row in tensor_table(config) for matrix in ("lora_A", "lora_B")})
        raise UserInputError(f"{source} holds tensors that fit no weight of its base model ({unknown[:2]}); is it an adapter for another model?")
    return renamed


def export_peft(
    adapter_weights: dict[str, torch.Tensor], config: ModelConfig, alpha: float, dropout: float, output: str | Path,
    base_model_name_or_path: str | None = None, force: bool = False, sources: Sequence[str | Path] = (),
) -> Path:
    """Write a LoRA adapter in PEFT's layout: adapter_config.json + adapter_model.safetensors.

    `adapter_weights` are the adapter's matrices under MiniGPT's names (`lora.lora_state_dict`),
    `config` the base model's shape. `peft.PeftModel.from_pretrained(base, output)` on the base
    exported with `export_hf` then computes what MiniGPT's base + adapter computes: the Hugging
    Face weights are MiniGPT's unpermuted, so A and B need no reordering either.
    """
    output = Path(output)
    tensors, rank, targets = peft_tensors(adapter_weights, config)
    _check_output(output, force, sources)
    record = peft_adapter_config(rank, alpha, dropout, targets, base_model_name_or_path)

    def fill(directory: Path) -> None:
        save_file(tensors, str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})
        _write_json(directory / PEFT_CONFIG, record)
        _write_export_marker(directory, "peft")

    return write_directory_atomically(output, fill)
