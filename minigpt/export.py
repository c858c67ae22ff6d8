"""MiniGPT <-> the outside world: Hugging Face `transformers` folders and PEFT adapters.

MiniGPT's decoder has Llama's layout (RMSNorm, rotary, grouped-query attention, SwiGLU, no
biases), so moving weights in and out is mostly *renaming tensors*. One table below lists every
MiniGPT tensor with its Hugging Face name, its GGUF (llama.cpp) name and its shape; export reads
the table one way, import the other, and every tensor's shape is asserted on the way. (The GGUF
file itself is written by minigpt.gguf_file.)

    export_hf(...)      a folder `transformers.AutoModelForCausalLM` / `AutoTokenizer` load as is
    export_peft(...)    a LoRA adapter as PEFT saves one, for `peft.PeftModel.from_pretrained`
    import_hf_llama(..) a local Hugging Face Llama folder -> a MiniGPT model, tokenizer and config

Two details are worth knowing:

* Tied embeddings. MiniGPT reads tokens and writes them with the same matrix. Hugging Face says
  so with `"tie_word_embeddings": true` and stores the matrix once (as the embedding); llama.cpp
  falls back to `token_embd.weight` when a file has no `output.weight`. Either way, no copy.
* Rotary layout. MiniGPT and Hugging Face rotate channel i of a head together with channel
  i + head_dim/2 ("rotate half"), so the Hugging Face export needs no permutation and a LoRA
  adapter's matrices go to PEFT as they are. (llama.cpp's `llama` architecture rotates
  neighbours: minigpt.gguf_file permutes q and k rows for it, in a merged model.)

Refused on import, each with one sentence (MiniGPT has no code for them, and silently dropping
them would give a model that loads but talks nonsense): biases, rope scaling, sliding-window
attention, an activation other than SiLU, a head width other than hidden_size / heads, sharded
weights, and a tokenizer that is neither byte-level BPE nor a MiniGPT character tokenizer or
lacks MiniGPT's special tokens at ids 0-3. Untied embeddings are mapped (MiniGPT can keep a
separate output head: `tie_embeddings = false`).

`transformers` and `gguf` are optional packages (`pip install -e ".[export]"`): they are
imported inside the functions that need them, so MiniGPT itself runs without them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from minigpt.config import ModelConfig, RunConfig
from minigpt.errors import UserInputError
from minigpt.files import write_directory_atomically
from minigpt.lora import LORA_TARGETS, LoRAConfig
from minigpt.model import GPT
from minigpt.version import __version__
from minigpt.tokenizer import EOS_TOKEN, IM_END_TOKEN, IM_START_TOKEN, PAD_TOKEN, UNKNOWN_TOKEN, Tokenizer, load_tokenizer


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


@dataclass(frozen=True)
class TensorName:
    """One row of the conversion table: a MiniGPT tensor, its names elsewhere, its shape."""

    minigpt: str
    hf: str
    gguf: str
    shape: tuple[int, ...]


def tensor_table(config: ModelConfig) -> list[TensorName]:
    """Every stored tensor of a MiniGPT model of this shape (the output head only when untied)."""
    width, vocab, hidden = config.n_embd, config.vocab_size, config.hidden_dim
    q_rows, kv_rows = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    table = [TensorName("token_embedding.weight", "model.embed_tokens.weight", "token_embd.weight", (vocab, width))]
    for i in range(config.n_layer):
        mini, hf, gguf = f"blocks.{i}.", f"model.layers.{i}.", f"blk.{i}."
        table += [
            TensorName(mini + "attention_norm.weight", hf + "input_layernorm.weight", gguf + "attn_norm.weight", (width,)),
            TensorName(mini + "attention.q_proj.weight", hf + "self_attn.q_proj.weight", gguf + "attn_q.weight", (q_rows, width)),
            TensorName(mini + "attention.k_proj.weight", hf + "self_attn.k_proj.weight", gguf + "attn_k.weight", (kv_rows, width)),
            TensorName(mini + "attention.v_proj.weight", hf + "self_attn.v_proj.weight", gguf + "attn_v.weight", (kv_rows, width)),
            TensorName(mini + "attention.o_proj.weight", hf + "self_attn.o_proj.weight", gguf + "attn_output.weight", (width, q_rows)),
            TensorName(mini + "mlp_norm.weight", hf + "post_attention_layernorm.weight", gguf + "ffn_norm.weight", (width,)),
            TensorName(mini + "mlp.gate_proj.weight", hf + "mlp.gate_proj.weight", gguf + "ffn_gate.weight", (hidden, width)),
            TensorName(mini + "mlp.up_proj.weight", hf + "mlp.up_proj.weight", gguf + "ffn_up.weight", (hidden, width)),
            TensorName(mini + "mlp.down_proj.weight", hf + "mlp.down_proj.weight", gguf + "ffn_down.weight", (width, hidden)),
        ]
    table.append(TensorName("final_norm.weight", "model.norm.weight", "output_norm.weight", (width,)))
    if not config.tie_embeddings:
        table.append(TensorName("lm_head.weight", "lm_head.weight", "output.weight", (vocab, width)))
    return table


def _checked(tensor: torch.Tensor, row: TensorName, source: str) -> torch.Tensor:
    if tuple(tensor.shape) != row.shape:
        raise UserInputError(f"{source}: tensor {row.hf} has shape {tuple(tensor.shape)}, expected {row.shape}.")
    return tensor


def _minigpt_tensors(model: GPT) -> list[tuple[TensorName, torch.Tensor]]:
    """(table row, float tensor on the CPU) for every stored tensor of `model`, shapes asserted."""
    state = model.state_dict()
    return [(row, _checked(state[row.minigpt].detach().cpu().contiguous(), row, "MiniGPT model")) for row in tensor_table(model.config)]


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
    """config.json of the equivalent `LlamaForCausalLM`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        # A MiniGPT document starts after <|endoftext|> and ends with it, so it is BOS and EOS both.
        "bos_token_id": tokenizer.eos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "use_cache": True,
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


def export_hf(model: GPT, tokenizer: Tokenizer, output: str | Path, force: bool = False, sources: Sequence[str | Path] = ()) -> Path:
    """Write a Hugging Face `LlamaForCausalLM` folder (weights, configs, tokenizer, chat template).
    `force` replaces an earlier export there; `sources` are the folders the model came from
    (never replaced)."""
    output = Path(output)
    _check_output(output, force, sources)
    config = model.config
    # Tied: the embedding is stored once and transformers ties lm_head to it on load.
    tensors = {row.hf: tensor.float().clone() for row, tensor in _minigpt_tensors(model)}

    def fill(directory: Path) -> None:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        _write_json(directory / "config.json", hf_config(config, tokenizer))
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


def _rope_theta(hf: dict, source: str) -> float:
    """rope_theta, read from the top level (transformers 4) or `rope_parameters` (transformers 5)."""
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type", "default")
    if scaling or rope_type != "default":
        raise UserInputError(f"{source} uses rope scaling ({scaling or rope_type}), which MiniGPT does not implement.")
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _hf_model_config(hf: dict, source: str) -> ModelConfig:
    """Check that the Hugging Face config describes a model MiniGPT can represent; build its ModelConfig."""
    if hf.get("model_type") != "llama":
        raise UserInputError(f"{source} is a '{hf.get('model_type')}' model; MiniGPT imports Llama models only.")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise UserInputError(f"{source} sets {key}, but MiniGPT's layers have no biases.")
    if hf.get("sliding_window"):
        raise UserInputError(f"{source} uses sliding-window attention, which MiniGPT does not implement.")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserInputError(f"{source} uses the {hf['hidden_act']} activation; MiniGPT's SwiGLU uses silu.")
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", width // heads) * heads != width:
        raise UserInputError(f"{source} has head_dim {hf['head_dim']} x {heads} heads != hidden_size {width}; MiniGPT needs them equal.")
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=width,
        ffn_hidden=hf["intermediate_size"], rope_theta=_rope_theta(hf, source), norm_eps=hf["rms_norm_eps"],
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _import_tokenizer(path: Path) -> Tokenizer:
    """MiniGPT's tokenizer for an HF tokenizer.json: byte-level BPE or a MiniGPT character tokenizer."""
    tokenizer = load_tokenizer(path)  # refuses other models and special tokens not at ids 0-3
    decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
    if tokenizer.kind == "bpe" and decoder.get("type") != "ByteLevel":
        raise UserInputError(f"{path} is a BPE tokenizer but not byte-level (decoder {decoder.get('type')}); MiniGPT needs byte-level BPE.")
    return tokenizer


def import_hf_llama(folder: str | Path) -> tuple[GPT, Tokenizer, RunConfig]:
    """Load a local Hugging Face Llama folder (config.json, model.safetensors, tokenizer.json) as MiniGPT.

    Returns the model (on the CPU, in eval mode, float32), its tokenizer and a RunConfig whose
    `model` section describes it (training settings are the defaults).
    """
    folder = Path(folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            sharded = name == "model.safetensors" and (folder / "model.safetensors.index.json").is_file()
            detail = "sharded weights are not supported; merge them into one model.safetensors" if sharded else f"it has no {name}"
            raise UserInputError(f"{folder} cannot be imported: {detail}.")
    config = _hf_model_config(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    tokenizer = _import_tokenizer(folder / "tokenizer.json")
    if config.vocab_size < tokenizer.vocab_size:
        raise UserInputError(f"{folder}: vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens.")
    weights = load_file(str(folder / "model.safetensors"))
    table = tensor_table(config)
    expected = {row.hf for row in table} | ({"lm_head.weight"} if config.tie_embeddings else set())  # tied: a stored copy is ignored
    missing, unexpected = {row.hf for row in table} - set(weights), set(weights) - expected
    if missing or unexpected:
        raise UserInputError(
            f"{folder}/model.safetensors does not match a Llama model of this config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})."
        )
    model = GPT(config)
    state = {row.minigpt: _checked(weights[row.hf], row, str(folder)) for row in table}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["token_embedding.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval(), tokenizer, RunConfig(model=config)


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

    PEFT names its targets by module (q_proj, ..., or "all-linear"); MiniGPT's short names (q, ...)
    name the same modules. Refused in one sentence: another adapter type, a base that is not a
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
