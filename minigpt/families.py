"""Pretrained families: a Hugging Face folder's config.json and tensors <-> MiniGPT's one model.

MiniGPT's `model.py` runs four families of pretrained models; each difference between them is a
switch of `ModelConfig` (see the table in docs: README "Pretrained models"):

    family   architecture        what its config.json turns on
    llama    LlamaForCausalLM    Llama 2/3.x, SmolLM, TinyLlama; Llama 3's `llama3` rope scaling, untied heads
    qwen2    Qwen2ForCausalLM    Qwen2, Qwen2.5: biases on q, k and v
    qwen3    Qwen3ForCausalLM    RMSNorm on each head's queries and keys, head_dim != width / heads
    gemma3   Gemma3ForCausalLM   (model_type gemma3_text) GeLU-tanh gate, (1 + w) norms, norms after
                                 attention and the MLP, q/k norms, embeddings x sqrt(width),
                                 query_pre_attn_scalar, sliding-window local layers with their own
                                 rotary base, global layers (optionally with linear rope scaling)

This module is the only place that knows their names:

    model_config(hf, source)     config.json (a dict) -> ModelConfig, or one sentence saying why not
    hugging_face_config(config)  ModelConfig -> the architecture part of config.json (for export)
    tensor_table(config)         every stored tensor: its MiniGPT name, Hugging Face name, GGUF
                                 (llama.cpp) name and shape; import and export read it both ways
    load_model(folder, dtype)    the weights of a folder (one safetensors file or shards listed by
                                 model.safetensors.index.json) in a GPT, read tensor by tensor

Both spellings of rotary settings are read: transformers 4's `rope_theta` / `rope_scaling` (and
Gemma 3's `rope_local_base_freq`) and transformers 5's `rope_parameters` (for Gemma 3 one entry
per layer type). Export writes the first, which both versions read.

Anything else is refused in one sentence naming what is supported (`SUPPORTED`): other model
types, mixtures of experts, vision towers, rope scaling types not implemented, code shipped with
the model (`auto_map`), sliding windows outside Gemma 3, and configurations too large for this
machine's memory (checked before anything is allocated).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from safetensors import SafetensorError, safe_open

from minigpt.config import ModelConfig, validate_model
from minigpt.errors import UserInputError
from minigpt.model import GPT

SUPPORTED = ("MiniGPT loads Llama (LlamaForCausalLM), Qwen2/2.5 (Qwen2ForCausalLM), Qwen3 (Qwen3ForCausalLM) "
             "and Gemma 3 text (Gemma3ForCausalLM) folders")
ROPE_TYPES = ("default", "linear", "llama3")  # rotary_frequencies implements these
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Family:
    """One supported family: its name in ModelConfig.family, config.json's model_type and
    architecture, and whether its output head is tied when config.json does not say."""

    name: str
    model_type: str
    architecture: str
    tied_by_default: bool


FAMILIES = {
    family.name: family
    for family in (
        Family("llama", "llama", "LlamaForCausalLM", tied_by_default=False),
        Family("qwen2", "qwen2", "Qwen2ForCausalLM", tied_by_default=False),
        Family("qwen3", "qwen3", "Qwen3ForCausalLM", tied_by_default=False),
        Family("gemma3", "gemma3_text", "Gemma3ForCausalLM", tied_by_default=True),
    )
}
BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES.values()}


def _refuse(source: str, problem: str) -> UserInputError:
    return UserInputError(f"{source} {problem}; {SUPPORTED}.")


# ----------------------------------------------------------------------------- config.json -> ModelConfig


def model_config(hf: dict, source: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (`hf`), refusing in one sentence (naming
    `source`) anything MiniGPT's model cannot compute exactly."""
    family = _family(hf, source)
    width, heads, layers = (_size(hf, key, source) for key in ("hidden_size", "num_attention_heads", "num_hidden_layers"))
    head_dim = _size(hf, "head_dim", source) if hf.get("head_dim") else width // heads
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    wanted_activation = "gelu_pytorch_tanh" if family.name == "gemma3" else "silu"
    if activation != wanted_activation:
        raise _refuse(source, f"uses the {activation} activation where a {family.architecture} uses {wanted_activation}")
    if hf.get("mlp_bias") or (hf.get("attention_bias") and family.name != "qwen2"):
        raise _refuse(source, "has biases on its attention output or MLP layers, which MiniGPT's model does not have")
    theta, scaling, local_theta = _rope(hf, family, source)
    tied = hf.get("tie_word_embeddings", family.tied_by_default)
    if not isinstance(tied, bool):
        raise UserInputError(f"{source} gives tie_word_embeddings = {tied!r}, where true or false is needed; the file is damaged.")
    config = ModelConfig(
        vocab_size=_size(hf, "vocab_size", source), block_size=_size(hf, "max_position_embeddings", source),
        n_layer=layers, n_head=heads, n_kv_head=_size(hf, "num_key_value_heads", source) if hf.get("num_key_value_heads") else heads,
        n_embd=width, ffn_hidden=_size(hf, "intermediate_size", source), rope_theta=theta,
        norm_eps=_number(hf, "rms_norm_eps", 1e-6, source),
        tie_embeddings=tied,
        family=family.name,
        head_size=head_dim,
        attention_bias=family.name == "qwen2",  # Qwen2's q, k and v always have biases
        qk_norm=family.name in ("qwen3", "gemma3"),
        rope_scaling=scaling,
    )
    if family.name == "gemma3":
        config.norm_unit_offset = config.sandwich_norms = config.scale_embeddings = True
        config.mlp_activation = "gelu_tanh"
        config.query_pre_attn_scalar = _number(hf, "query_pre_attn_scalar", 256, source)
        config.rope_local_theta = local_theta
        config.sliding_window, config.layer_types = _gemma_layers(hf, layers, source)
    else:
        _refuse_sliding_window(hf, family, source)
    if heads % config.kv_heads or head_dim % 2:
        raise _refuse(source, f"has {heads} query heads, {config.kv_heads} key/value heads and head_dim {head_dim}, "
                              "which grouped-query attention with rotary embeddings cannot split")
    try:
        validate_model(config)  # what every model must satisfy (rope scaling settings as positive numbers, ...)
    except UserInputError as error:
        raise UserInputError(f"{source} describes a model MiniGPT cannot build: {error}") from None
    check_fits_in_memory(config, source)
    return config


def _family(hf: dict, source: str) -> Family:
    """The family config.json names, refusing code shipped with the model, vision models, MoE and other types."""
    if hf.get("auto_map"):
        raise _refuse(source, "ships its own modelling code (auto_map, trust_remote_code), which MiniGPT never runs")
    model_type = hf.get("model_type")
    if not isinstance(model_type, str):
        raise _refuse(source, f"gives model_type = {model_type!r}, not a name")
    if model_type == "gemma3" or "vision_config" in hf:
        raise _refuse(source, "is a vision-language model (Gemma3ForConditionalGeneration has a vision tower); "
                              "give the text model (model_type gemma3_text) instead")
    if any(hf.get(key) for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")):
        raise _refuse(source, "is a mixture of experts")
    family = BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise _refuse(source, f"is a '{model_type}' model")
    architectures = hf.get("architectures") or [family.architecture]
    if not isinstance(architectures, list):
        raise _refuse(source, f"gives architectures = {architectures!r}, not a list of names")
    if architectures != [family.architecture]:
        raise _refuse(source, f"is a {', '.join(map(str, architectures))}, not a {family.architecture}")
    return family


def _size(hf: dict, key: str, source: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserInputError(f"{source} gives {key} = {value!r}, where a positive whole number is needed; the file is damaged.")
    return value


def _rope(hf: dict, family: Family, source: str) -> tuple[float, dict, float]:
    """(rope_theta, rope_scaling of the global layers or {}, the local layers' theta or 0), from
    transformers 4's keys or transformers 5's `rope_parameters`."""
    parameters = _table(hf, "rope_parameters", source)
    if family.name == "gemma3":
        if "full_attention" in parameters or "sliding_attention" in parameters:  # transformers 5: one entry per layer type
            full = _table(parameters, "full_attention", source)
            local = _table(parameters, "sliding_attention", source)
        else:  # transformers 4: rope_theta and rope_scaling for the global layers, rope_local_base_freq for the local ones
            full = {**_table(hf, "rope_scaling", source), "rope_theta": hf.get("rope_theta", 1_000_000.0)}
            local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
        if _rope_type(local) != "default":
            raise _refuse(source, f"scales the rotary embeddings of its local layers ({_rope_type(local)})")
        return _number(full, "rope_theta", 1_000_000.0, source), _scaling(full, source), _number(local, "rope_theta", 10_000.0, source)
    settings = parameters or {**_table(hf, "rope_scaling", source), "rope_theta": hf.get("rope_theta", 10_000.0)}
    return _number(settings, "rope_theta", 10_000.0, source), _scaling(settings, source), 0.0


def _table(settings: dict, key: str, source: str) -> dict:
    """settings[key], an object (or {} when absent or null), refused in one sentence when it is something else."""
    value = settings.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserInputError(f"{source} gives {key} = {value!r}, where an object of settings is needed; the file is damaged.")
    return value


def _number(settings: dict, key: str, default: float, source: str) -> float:
    """settings[key] (`default` when absent or null) as a float, refused unless a positive finite number."""
    value = settings.get(key)
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserInputError(f"{source} gives {key} = {value!r}, where a positive number is needed; the file is damaged.")
    return float(value)


def _rope_type(settings: dict) -> str:
    rope_type = settings.get("rope_type") or settings.get("type") or "default"  # "type": the oldest configs' spelling
    return rope_type if isinstance(rope_type, str) else repr(rope_type)


def _scaling(settings: dict, source: str) -> dict:
    """The rope scaling ModelConfig keeps (only the keys rotary_frequencies reads), or {} for none."""
    rope_type = _rope_type(settings)
    if rope_type not in ROPE_TYPES:
        raise _refuse(source, f"uses '{rope_type}' rope scaling, which MiniGPT does not implement (it does {', '.join(ROPE_TYPES)})")
    if settings.get("attention_factor") not in (None, 1, 1.0):
        raise _refuse(source, f"scales attention by {settings['attention_factor']} for its rope scaling, which MiniGPT does not implement")
    keys = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[rope_type]
    if rope_type == "default":
        return {}
    missing = [key for key in keys if key not in settings]
    if missing:
        raise UserInputError(f"{source} uses {rope_type} rope scaling without {', '.join(missing)}; the file is damaged.")
    return {"rope_type": rope_type, **{key: settings[key] for key in keys}}


def _gemma_layers(hf: dict, layers: int, source: str) -> tuple[int, list[str]]:
    """(sliding_window, layer_types) of a Gemma 3: config.json's layer_types, or the older
    `sliding_window_pattern` (every pattern-th layer global, the others local)."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise _refuse(source, f"sets {key}, which Gemma 3 models do not use and MiniGPT does not implement")
    if hf.get("use_bidirectional_attention"):
        raise _refuse(source, "uses bidirectional attention (an embedding model), not a causal language model")
    pattern = _size(hf, "sliding_window_pattern", source) if "sliding_window_pattern" in hf else 6
    types = hf.get("layer_types") or _window_pattern(pattern, layers)
    if not isinstance(types, list) or len(types) != layers or not set(map(str, types)) <= {"full_attention", "sliding_attention"}:
        raise UserInputError(f"{source} lists layer_types {types}, not full_attention/sliding_attention for each of its {layers} layers.")
    window = _size(hf, "sliding_window", source) if "sliding_attention" in types else 0
    return window, list(types)


def _window_pattern(pattern: int, layers: int) -> list[str]:
    """Gemma 3's layer types before `layer_types` existed: every pattern-th layer global, the others local."""
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def _refuse_sliding_window(hf: dict, family: Family, source: str) -> None:
    layer_types = hf.get("layer_types") or []
    if not isinstance(layer_types, list):
        raise UserInputError(f"{source} gives layer_types = {layer_types!r}, where a list is needed; the file is damaged.")
    if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
        raise _refuse(source, f"turns on sliding-window attention, which MiniGPT implements for Gemma 3 only, not for {family.architecture}")


def parameter_count(config: ModelConfig) -> int:
    """The weights a model of this configuration stores, counted from the configuration alone."""
    width, q_rows, kv_rows = config.n_embd, config.n_head * config.head_dim, config.kv_heads * config.head_dim
    per_layer = width * (2 * q_rows + 2 * kv_rows) + 3 * width * config.hidden_dim
    return config.vocab_size * width * (1 if config.tie_embeddings else 2) + config.n_layer * per_layer


def check_fits_in_memory(config: ModelConfig, source: str, bytes_per_weight: int = 2) -> None:
    """Refuse a configuration whose weights could not fit in this machine's memory at
    `bytes_per_weight` (16 bits unless told), before anything is allocated (a damaged or hostile
    config.json could ask for terabytes)."""
    needed, total = parameter_count(config) * bytes_per_weight, psutil.virtual_memory().total
    if needed > total:
        raise UserInputError(f"{source} describes a model of {parameter_count(config) / 1e9:.1f}B weights "
                             f"({needed / 2**30:.0f} GiB in {8 * bytes_per_weight} bits), more than this machine's "
                             f"{total / 2**30:.0f} GiB of memory.")


# ----------------------------------------------------------------------------- ModelConfig -> config.json


def hugging_face_config(config: ModelConfig) -> dict:
    """The architecture part of config.json for the model's family (MiniGPT's own models are
    Llamas), in transformers 4's spelling, which transformers 5 reads too. Token ids, dtype and
    the like are the caller's (minigpt.export)."""
    family = FAMILIES.get(config.family, FAMILIES["llama"])
    result = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) or None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if family.name == "gemma3":
        result.update({
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": int(scalar) if (scalar := config.query_pre_attn_scalar).is_integer() else scalar,  # transformers 5 wants an int
            "rope_local_base_freq": config.rope_local_theta, "sliding_window": config.sliding_window or None,
            "layer_types": list(config.layer_types), "final_logit_softcapping": None, "attn_logit_softcapping": None,
            "attention_bias": False,
        })
        # transformers before 4.53 reads the window pattern instead of layer_types: every pattern-th layer global.
        patterns = [pattern for pattern in range(1, config.n_layer + 1) if config.layer_types == _window_pattern(pattern, config.n_layer)]
        if patterns:
            result["sliding_window_pattern"] = patterns[0]
    else:
        result.update({"hidden_act": "silu", "attention_bias": False})
        if family.name == "llama":
            result["mlp_bias"] = False
        else:
            result.update({"use_sliding_window": False, "sliding_window": None})
    return result


# ----------------------------------------------------------------------------- tensor names


@dataclass(frozen=True)
class TensorName:
    """One row of the conversion table: a MiniGPT tensor, its names elsewhere, its shape."""

    minigpt: str
    hf: str
    gguf: str
    shape: tuple[int, ...]


def tensor_table(config: ModelConfig) -> list[TensorName]:
    """Every stored tensor of a model of this configuration (the output head only when untied),
    named as MiniGPT, Hugging Face and llama.cpp name it, with its shape.

    Gemma 3 names its norms differently: its `post_attention_layernorm` follows attention (a
    sandwich norm), and the norm before the MLP is `pre_feedforward_layernorm`; in Llama and Qwen
    `post_attention_layernorm` is the norm before the MLP.
    """
    width, vocab, hidden, head = config.n_embd, config.vocab_size, config.hidden_dim, config.head_dim
    q_rows, kv_rows = config.n_head * head, config.kv_heads * head
    table = [TensorName("token_embedding.weight", "model.embed_tokens.weight", "token_embd.weight", (vocab, width))]
    for i in range(config.n_layer):
        mini, hf, gguf = f"blocks.{i}.", f"model.layers.{i}.", f"blk.{i}."

        def row(minigpt: str, hf_name: str, gguf_name: str, shape: tuple[int, ...]) -> TensorName:
            return TensorName(mini + minigpt, hf + hf_name, gguf + gguf_name, shape)

        table.append(row("attention_norm.weight", "input_layernorm.weight", "attn_norm.weight", (width,)))
        for projection, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            table.append(row(f"attention.{projection}_proj.weight", f"self_attn.{projection}_proj.weight", f"attn_{projection}.weight", (rows, width)))
            if config.attention_bias:
                table.append(row(f"attention.{projection}_proj.bias", f"self_attn.{projection}_proj.bias", f"attn_{projection}.bias", (rows,)))
        if config.qk_norm:
            table.append(row("attention.q_norm.weight", "self_attn.q_norm.weight", "attn_q_norm.weight", (head,)))
            table.append(row("attention.k_norm.weight", "self_attn.k_norm.weight", "attn_k_norm.weight", (head,)))
        table.append(row("attention.o_proj.weight", "self_attn.o_proj.weight", "attn_output.weight", (width, q_rows)))
        if config.sandwich_norms:
            table.append(row("post_attention_norm.weight", "post_attention_layernorm.weight", "post_attention_norm.weight", (width,)))
            table.append(row("mlp_norm.weight", "pre_feedforward_layernorm.weight", "ffn_norm.weight", (width,)))
            table.append(row("post_mlp_norm.weight", "post_feedforward_layernorm.weight", "post_ffw_norm.weight", (width,)))
        else:
            table.append(row("mlp_norm.weight", "post_attention_layernorm.weight", "ffn_norm.weight", (width,)))
        table += [
            row("mlp.gate_proj.weight", "mlp.gate_proj.weight", "ffn_gate.weight", (hidden, width)),
            row("mlp.up_proj.weight", "mlp.up_proj.weight", "ffn_up.weight", (hidden, width)),
            row("mlp.down_proj.weight", "mlp.down_proj.weight", "ffn_down.weight", (width, hidden)),
        ]
    table.append(TensorName("final_norm.weight", "model.norm.weight", "output_norm.weight", (width,)))
    if not config.tie_embeddings:
        table.append(TensorName("lm_head.weight", "lm_head.weight", "output.weight", (vocab, width)))
    return table


def checked(tensor: torch.Tensor, row: TensorName, source: str) -> torch.Tensor:
    """`tensor`, refused in one sentence if its shape is not the table's."""
    if tuple(tensor.shape) != row.shape:
        raise UserInputError(f"{source}: tensor {row.hf} has shape {tuple(tensor.shape)}, expected {row.shape}.")
    return tensor


# ----------------------------------------------------------------------------- loading a folder


def read_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder's config.json."""
    path = Path(folder) / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserInputError(f"{path} cannot be read as JSON ({error}).") from None
    if not isinstance(hf, dict):
        raise UserInputError(f"{path} does not hold a JSON object.")
    return model_config(hf, str(path))


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files holding a folder's weights: model.safetensors, or the shards
    model.safetensors.index.json lists. A folder with only PyTorch pickles is refused (loading a
    pickle can run code)."""
    folder = Path(folder)
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({folder / name for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserInputError(f"{index} cannot be read as a safetensors index ({error}).") from None
        absent = [shard.name for shard in shards if not shard.is_file()]
        if absent:
            raise UserInputError(f"{folder} lacks the weight shard(s) {', '.join(absent[:3])} that {WEIGHTS_INDEX} lists; download them too.")
        return shards
    raise UserInputError(f"{folder} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}; MiniGPT reads safetensors weights only "
                         "(never PyTorch pickles, which can run code when loaded).")


def load_model(folder: str | Path, dtype: torch.dtype | None = torch.float32) -> GPT:
    """A Hugging Face folder's model as a MiniGPT GPT (on the CPU, in eval mode), in `dtype`
    (None: the dtype the weights are stored in).

    The model is laid out on the meta device (no memory), and each tensor is read from its file,
    converted and put in place one at a time: a bfloat16 folder loads into float32 holding at most
    one float32 tensor besides the model, and into bfloat16 with no float32 copy at all. Every
    tensor's name and shape is checked against `tensor_table`; a stored `lm_head.weight` of a tied
    model is ignored (it is the embedding).
    """
    folder = Path(folder)
    config = read_config(folder)
    check_fits_in_memory(config, str(folder / "config.json"), torch.empty((), dtype=dtype or torch.bfloat16).element_size())
    table = tensor_table(config)
    files = weight_files(folder)
    with torch.device("meta"):
        model = GPT(config)
    state, stored_names = {}, set()
    wanted = {row.hf: row for row in table}
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    stored_names.add(name)
                    if name in wanted:
                        row = wanted[name]
                        tensor = checked(handle.get_tensor(name), row, str(file))
                        state[row.minigpt] = tensor if dtype is None else tensor.to(dtype)
    except (OSError, SafetensorError) as error:
        raise UserInputError(f"{folder}'s weights cannot be read ({error}); download them again.") from None
    # A tied model's stored head is the embedding; rotary frequencies some older files saved are recomputed here.
    ignored = {name for name in stored_names if name.endswith("rotary_emb.inv_freq")} | ({"lm_head.weight"} if config.tie_embeddings else set())
    missing, unexpected = set(wanted) - stored_names, stored_names - set(wanted) - ignored
    if missing or unexpected:
        raise UserInputError(f"{folder}'s weights do not match its config.json's {FAMILIES[config.family].architecture} "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}).")
    if config.tie_embeddings:
        state["lm_head.weight"] = state["token_embedding.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:  # assign put two Parameters in place: make them one again
        model.lm_head.weight = model.token_embedding.weight
    model.set_rotary_frequencies()  # buffers derived from the configuration, laid out on the meta device until now
    return model.eval()
