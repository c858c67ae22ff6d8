"""A MiniGPT model as one llama.cpp GGUF file (for llama.cpp, LM Studio, Ollama).

A GGUF file holds three things, and this module writes each in its own part:

    hyper-parameters  key/value pairs named after llama.cpp's architecture ("qwen2.block_count"),
                      which tell llama.cpp how to build the graph              `_write_hyper_parameters`
    tensors           under llama.cpp's names, in f32, f16 or a block format   `gguf_tensors`
    tokenizer         the vocabulary as llama.cpp's own tokenizer reads it     `gguf_vocabulary`

Each family maps onto the llama.cpp architecture of the same name; MiniGPT's own models are Llama:

    family   architecture  what differs in the file
    minigpt  llama         q and k rows permuted (below)
    llama    llama         q and k rows permuted; Llama 3's rope scaling as a `rope_freqs` tensor
                           (linear rope scaling, in any family, as two keys)
    qwen2    qwen2         q, k, v biases
    qwen3    qwen3         q and k norms; key_length when head_dim != width / heads
    gemma3   gemma3        four norms a layer, each stored as 1 + w; the sliding window

Tensor names come from the one table that names every MiniGPT tensor in Hugging Face's and
llama.cpp's terms (`tensor_table`), so nothing is renamed here.

Rotary layout. MiniGPT and Hugging Face rotate channel i of a head with channel i + head_dim/2
("rotate half"). llama.cpp's `llama` architecture rotates neighbours (2i, 2i+1); its qwen2, qwen3
and gemma3 architectures use the rotate-half ("NEOX") layout. So only for `llama` are the rows of
q_proj and k_proj reordered (`permute_for_gguf`): row i and row i + head_dim/2 of each head become
neighbours, queries and keys the same way, so their dot products and the model are unchanged.

Gemma's norms compute x * (1 + w) (a zero weight is the identity). llama.cpp's gemma3 multiplies
by the stored weight, so 1 + w is stored, as llama.cpp's own converter does.

Weight types: f32; f16; q8_0, q5_0, q4_0 (minigpt.quants). Vectors (norms, biases) stay float32 in
every type, as in llama.cpp's converter. A row that does not divide into 32-number blocks is
stored f16. In q5_0 and q4_0 files the token embedding and output head are q8_0: they are the
tensors most hurt by 4-5 bits, and llama.cpp's own quantizer also keeps them finer (q6_K).

The tokenizer. Byte-level BPE (MiniGPT's, Llama 3's, Qwen's) is llama.cpp's "gpt2" model: tokens,
merges, and `tokenizer.ggml.pre`, the name of the regex that splits text into words before
merging (llama.cpp knows them by name, so it is recognised from tokenizer.json, or refused).
SentencePiece-style BPE (Gemma, Llama 2: "▁" for spaces, byte fallback) is llama.cpp's "llama"
model, which merges by token *score*: a token's score is minus the rank of the merge that makes
it, so the highest-scoring pair is the one Hugging Face's BPE would merge first.

`gguf` is an optional package (`pip install -e ".[export]"`), imported where it is needed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from minigpt.chat_template import JinjaTemplate
from minigpt.config import ModelConfig
from minigpt.errors import UserInputError
from minigpt.export import CHAT_TEMPLATE, OLLAMA_TEMPLATE, _check_output, _minigpt_tensors, _write_export_marker
from minigpt.files import write_directory_atomically
from minigpt.model import GPT
from minigpt.quants import BLOCK, QUANTIZERS
from minigpt.tokenizer import Tokenizer

GGUF_OUTTYPES = ("f32", "f16", "q8_0", "q5_0", "q4_0")
GGUF_FILE_NAME = "model.gguf"
ARCHITECTURES = {"minigpt": "llama", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}

def _gguf():
    """The optional `gguf` package, imported here rather than at the top so MiniGPT runs without it."""
    try:
        import gguf
    except ImportError:
        raise UserInputError("GGUF export needs the gguf package; install it with pip install -e '.[export]'.") from None
    return gguf


# ----------------------------------------------------------------------------- tensors


def permute_for_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of q_proj or k_proj from rotate-half to llama.cpp's interleaved pairs.

    Within each head the rows are [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}], where (x_i, y_i) is the pair
    rotated together. Viewed as (heads, 2, d/2, width) and swapped to (heads, d/2, 2, width), they
    become x_0, y_0, x_1, y_1, ...: each pair side by side, as llama.cpp's rotary kernel expects.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_from_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `permute_for_gguf`: interleaved pairs back to rotate-half halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """Llama 3's rope scaling as llama.cpp stores it: per frequency, the factor it divides by.

    Llama 3.x stretches the slow rotary frequencies (wavelengths longer than the original context
    / low_freq_factor) by `factor`, keeps the fast ones (shorter than context / high_freq_factor)
    and blends in between; transformers multiplies the frequencies, llama.cpp divides by these.
    """
    scaling = config.rope_scaling
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    context = scaling["original_max_position_embeddings"]
    frequencies = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim)
    wavelengths = 2 * math.pi / frequencies
    smooth = (context / wavelengths - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelengths < context / high, 1.0, np.where(wavelengths > context / low, factor, blended))
    return factors.astype(np.float32)


def _ggml_type_of(name: str, data: np.ndarray, outtype: str):
    """The GGML type a tensor is stored in (see the module's docstring for the rules)."""
    types = _gguf().GGMLQuantizationType
    if outtype == "f32" or data.ndim == 1:
        return types.F32
    if outtype == "f16" or data.shape[-1] % BLOCK:
        return types.F16
    if outtype in ("q5_0", "q4_0") and name.split(".")[0] in ("token_embd", "output"):
        return types.Q8_0
    return getattr(types, outtype.upper())


def _stored(data: np.ndarray, ggml_type) -> np.ndarray:
    """The tensor's data as written: float32, float16, or quantised blocks (bytes)."""
    types = _gguf().GGMLQuantizationType
    if ggml_type == types.F32:
        return data
    if ggml_type == types.F16:
        return data.astype(np.float16)
    return QUANTIZERS[ggml_type.name.lower()](data)


def gguf_tensors(named_tensors: Sequence[tuple[str, torch.Tensor]], config: ModelConfig, outtype: str) -> list[tuple[str, np.ndarray, object]]:
    """(name, data as stored, GGML type) for every tensor given under its llama.cpp name, plus
    rope_freqs for Llama 3's rope scaling."""
    architecture = ARCHITECTURES[config.family]
    result = []
    for name, tensor in named_tensors:
        if architecture == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            tensor = permute_for_gguf(tensor, config.n_head if ".attn_q." in name else config.kv_heads)
        if config.norm_unit_offset and name.endswith("norm.weight"):
            tensor = 1 + tensor.float()  # Gemma: llama.cpp multiplies by the stored weight, which is 1 + w
        data = tensor.detach().float().cpu().numpy()
        ggml_type = _ggml_type_of(name, data, outtype)
        result.append((name, _stored(data, ggml_type), ggml_type))
    if config.rope_scaling.get("rope_type") == "llama3":
        result.append(("rope_freqs.weight", llama3_rope_factors(config), _gguf().GGMLQuantizationType.F32))
    return result


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp's names (`tokenizer.ggml.pre`) for the byte-level pre-tokenizers it implements, keyed
# by the split regex a tokenizer.json gives them. GPT-2's (MiniGPT's) is the ByteLevel step's own.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
PRE_TOKENIZER_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


@dataclass(frozen=True)
class SpecialTokens:
    """What llama.cpp needs to know about a tokenizer beyond its vocabulary."""

    bos: int | None  # beginning of a text
    eos: int  # end of a text
    eot: int | None  # end of a chat turn (generation of a reply stops there)
    pad: int | None
    add_bos: bool  # whether encoding a text puts bos in front
    chat_template: str | None  # Jinja, as transformers' apply_chat_template reads it

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos] + ([self.eot] if self.eot is not None and self.eot != self.eos else [])


def special_tokens_of(tokenizer: Tokenizer) -> SpecialTokens:
    """The special tokens of the model's tokenizer, in llama.cpp's terms.

    MiniGPT's own: <|endoftext|> begins and ends a document (never added by encode), <|im_end|>
    ends a chat turn, and the template is ChatML. A pretrained folder's tokenizer ("pretrained",
    minigpt.tokenizer.PretrainedTokenizer): its BOS (added when its tokenizer.json adds it), its EOS,
    the first other stop id of generation_config.json as the end of a turn (Llama 3's <|eot_id|>,
    Gemma's <end_of_turn>), its pad token and the folder's own Jinja template.
    """
    if tokenizer.kind != "pretrained":
        return SpecialTokens(bos=tokenizer.eos_id, eos=tokenizer.eos_id, eot=tokenizer.im_end_id, pad=tokenizer.pad_id,
                             add_bos=False, chat_template=CHAT_TEMPLATE)
    named_bos = tokenizer.special_tokens.get("bos_token")
    bos = tokenizer.bos_ids[0] if tokenizer.bos_ids else (tokenizer.backend.token_to_id(named_bos) if named_bos else None)
    turn_ends = [index for index in tokenizer.stop_ids(chat=True) if index != tokenizer.eos_id]
    template = tokenizer.chat_template.source if isinstance(tokenizer.chat_template, JinjaTemplate) else None  # a base model has none
    return SpecialTokens(bos=bos, eos=tokenizer.eos_id, eot=turn_ends[0] if turn_ends else None, pad=tokenizer.pad_id,
                         add_bos=bool(tokenizer.bos_ids), chat_template=template)


@dataclass
class GGUFVocabulary:
    """A tokenizer as llama.cpp reads it: `model` is "gpt2" (byte-level BPE, with `merges` and
    `pre`) or "llama" (SentencePiece-style, with `scores` and `add_space_prefix`)."""

    model: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str] | None = None
    pre: str | None = None
    scores: list[float] | None = None
    add_space_prefix: bool = False
    unknown: int | None = None


def _steps(part: dict | None) -> list[dict]:
    """The steps of a tokenizer.json normalizer or pre-tokenizer (a Sequence, one step, or none)."""
    if not part:
        return []
    if part["type"] != "Sequence":
        return [part]
    return [step for inner in part.get("pretokenizers") or part.get("normalizers") or [] for step in _steps(inner)]


def _byte_level_pre_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for how a byte-level tokenizer splits text, or one sentence saying why there is none."""
    steps = _steps(pre_tokenizer)
    types = [step["type"] for step in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM: digits one by one, then GPT-2's split
    if types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0]["pattern"].get("Regex")
        if pattern in PRE_TOKENIZER_NAMES:
            return PRE_TOKENIZER_NAMES[pattern]
    raise UserInputError(
        f"llama.cpp knows byte-level pre-tokenizers by name, and this tokenizer's ({' + '.join(types) or 'none'}) is none that "
        "MiniGPT can name (GPT-2, Llama 3, Qwen2, SmolLM); export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py."
    )


def _is_sentencepiece_style(tokenizer_json: dict) -> tuple[bool, bool]:
    """(whether spaces become "▁" as in SentencePiece, whether a "▁" is put before the text)."""
    metaspace = [step for step in _steps(tokenizer_json.get("pre_tokenizer")) if step["type"] == "Metaspace"]
    if metaspace:
        return True, metaspace[0].get("prepend_scheme", "always") != "never"
    normalizers = _steps(tokenizer_json.get("normalizer"))
    replaces = any(step["type"] == "Replace" and step["pattern"].get("String") == " " and step["content"] == "▁" for step in normalizers)
    prepends = any(step["type"] == "Prepend" and step["prepend"] == "▁" for step in normalizers)
    return replaces, prepends


def gguf_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocabulary:
    """The model's tokenizer in llama.cpp's terms, one entry per embedding row (rows past the
    tokenizer's vocabulary get placeholder tokens marked UNUSED)."""
    gguf = _gguf()
    tokenizer_json = json.loads(tokenizer.backend.to_str())
    model = tokenizer_json["model"]
    if model["type"] == "WordLevel":
        raise UserInputError(
            "llama.cpp has no character (WordLevel) tokenizer, so a character-tokenizer model cannot be a GGUF file; use --format hf."
        )
    if model["type"] != "BPE":
        raise UserInputError(f"llama.cpp reads BPE tokenizers here, and this one is {model['type']}; export with --format hf.")
    added = {token["id"]: token for token in tokenizer_json.get("added_tokens", [])}
    sentencepiece, add_space_prefix = _is_sentencepiece_style(tokenizer_json)
    byte_level = "ByteLevel" in {step["type"] for step in _steps(tokenizer_json.get("pre_tokenizer"))} or \
        (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel"
    if not byte_level and not (sentencepiece and model.get("byte_fallback")):
        raise UserInputError("llama.cpp reads byte-level BPE or SentencePiece-style BPE (▁ for spaces, byte fallback), "
                             "and this tokenizer is neither; export with --format hf.")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]  # newer files store pairs
    unknown = tokenizer.backend.token_to_id(model["unk_token"]) if model.get("unk_token") else None
    tokens, types = [], []
    for index in range(vocab_size):
        token = tokenizer.backend.id_to_token(index)
        tokens.append(f"[PAD{index}]" if token is None else token)
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif not byte_level and re.fullmatch(r"<0x[0-9A-F]{2}>", token):  # byte fallback: one UTF-8 byte
            types.append(gguf.TokenType.BYTE)
        elif index == unknown:
            types.append(gguf.TokenType.UNKNOWN)
        elif index in added:
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    if byte_level:
        return GGUFVocabulary("gpt2", tokens, types, merges=merges, pre=_byte_level_pre_name(tokenizer_json.get("pre_tokenizer")))
    rank = {}
    for index, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), index)  # the first merge that makes a token is the one BPE uses
    scores = [-float(rank[token]) if token in rank else 0.0 for token in tokens]
    return GGUFVocabulary("llama", tokens, types, scores=scores, add_space_prefix=add_space_prefix, unknown=unknown)


# ----------------------------------------------------------------------------- the file


def check_llama_cpp_can_run(config: ModelConfig) -> None:
    """Refuse, in one sentence, a model llama.cpp's architecture would compute differently."""
    if config.family not in ARCHITECTURES:
        raise UserInputError(f"MiniGPT writes GGUF files for the families {', '.join(ARCHITECTURES)}, not {config.family}.")
    scaling = config.rope_scaling.get("rope_type", "default")
    if scaling not in ("default", "linear") and not (scaling == "llama3" and ARCHITECTURES[config.family] == "llama"):
        raise UserInputError(f"MiniGPT writes linear rope scaling, and Llama 3's on Llama models, into GGUF files, not {scaling} "
                             f"on {config.family}; export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py.")
    if config.family != "gemma3":
        return
    # llama.cpp's gemma3 fixes three things that the Hugging Face config leaves open:
    global_every = 6  # every sixth layer attends to everything, the others to a sliding window
    expected = ["full_attention" if i % global_every == global_every - 1 else "sliding_attention" for i in range(config.n_layer)]
    layers = config.layer_types or ["full_attention"] * config.n_layer
    if config.sliding_window and layers != expected:
        raise UserInputError(f"llama.cpp's gemma3 makes every {global_every}th layer global and the others sliding-window, "
                             f"but this model's layers are {layers}; export with --format hf.")
    if config.sliding_window and (config.rope_local_theta or config.rope_theta) != 10000.0:
        raise UserInputError(f"llama.cpp's gemma3 rotates sliding-window layers with base 10000, but this model uses "
                             f"{config.rope_local_theta or config.rope_theta}; export with --format hf.")
    scale_dim = config.n_embd // config.n_head if config.n_layer == 62 else config.head_dim  # the 27B model, known by its depth
    if (config.query_pre_attn_scalar or config.head_dim) != scale_dim:
        raise UserInputError(f"llama.cpp's gemma3 scales attention by 1/sqrt({scale_dim}), but this model's query_pre_attn_scalar "
                             f"is {config.query_pre_attn_scalar}; export with --format hf.")


def _write_hyper_parameters(writer, config: ModelConfig) -> None:
    """The architecture's keys ("<arch>.block_count", ...) that tell llama.cpp the model's shape."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    if config.head_dim != config.n_embd // config.n_head:  # Qwen3, Gemma 3: heads are not width / heads wide
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_scaling.get("rope_type") == "linear":  # positions divided by `factor` (Gemma 3's global layers)
        writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.sliding_window:  # Gemma 3's local layers
        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_freq_base_swa(config.rope_local_theta or config.rope_theta)


def _write_tokenizer(writer, vocabulary: GGUFVocabulary, special: SpecialTokens) -> None:
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    if vocabulary.model == "gpt2":
        writer.add_tokenizer_pre(vocabulary.pre)
        writer.add_token_merges(vocabulary.merges)
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(vocabulary.scores)
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
        if vocabulary.unknown is not None:
            writer.add_unk_token_id(vocabulary.unknown)
    if special.bos is not None:
        writer.add_bos_token_id(special.bos)
    writer.add_eos_token_id(special.eos)
    if special.eot is not None:
        writer.add_eot_token_id(special.eot)
    if special.pad is not None:
        writer.add_pad_token_id(special.pad)
    writer.add_add_bos_token(special.add_bos)
    writer.add_add_eos_token(False)
    if special.chat_template is not None:  # a base model's folder may have none
        writer.add_chat_template(special.chat_template)


def _write_gguf(path: Path, name: str, config: ModelConfig, named_tensors: Sequence[tuple[str, torch.Tensor]],
                vocabulary: GGUFVocabulary, special: SpecialTokens, outtype: str) -> None:
    """Write one GGUF file: the hyper-parameters of `config`'s architecture, the tokenizer, and the
    tensors (given under their llama.cpp names) permuted and stored as `outtype` (already checked)."""
    gguf = _gguf()
    tensors = gguf_tensors(named_tensors, config, outtype)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q5_0": "MOSTLY_Q5_0", "q4_0": "MOSTLY_Q4_0"}
    writer = gguf.GGUFWriter(str(path), arch=ARCHITECTURES[config.family])
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[outtype]))
    _write_hyper_parameters(writer, config)
    _write_tokenizer(writer, vocabulary, special)
    for tensor_name, data, ggml_type in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(model: GPT, tokenizer: Tokenizer, output: str | Path, outtype: str = "f16", force: bool = False,
                sources: Sequence[str | Path] = ()) -> Path:
    """Write a folder holding `model.gguf` (the model's llama.cpp architecture) and an Ollama `Modelfile`.
    Everything that can be refused is refused before anything is written."""
    _gguf()
    output = Path(output)
    if outtype not in GGUF_OUTTYPES:
        raise UserInputError(f"Unknown --outtype '{outtype}'; choose one of {', '.join(GGUF_OUTTYPES)}.")
    config = model.config
    check_llama_cpp_can_run(config)
    vocabulary = gguf_vocabulary(tokenizer, config.vocab_size)  # refuses what llama.cpp cannot tokenize, before any writing
    special = special_tokens_of(tokenizer)
    _check_output(output, force, sources)

    def fill(directory: Path) -> None:
        named_tensors = [(row.gguf, tensor) for row, tensor in _minigpt_tensors(model)]  # a tied head once, as the embedding
        _write_gguf(directory / GGUF_FILE_NAME, output.name, config, named_tensors, vocabulary, special, outtype)
        (directory / "Modelfile").write_text(ollama_modelfile(config, [tokenizer.decode([index]) for index in special.stop_ids]))
        _write_export_marker(directory, "gguf")

    return write_directory_atomically(output, fill)


def ollama_modelfile(config: ModelConfig, stop_texts: Sequence[str]) -> str:
    """An Ollama Modelfile for the model.gguf next to it. MiniGPT's own models chat in ChatML,
    written here as Ollama's Go template; for a pretrained family Ollama reads the Jinja template
    inside the GGUF file (it recognises the families' templates), so only the stops are given."""
    lines = [f"FROM ./{GGUF_FILE_NAME}"]
    if config.family == "minigpt":
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATE}"""')
    lines += [f'PARAMETER stop "{text}"' for text in stop_texts]
    return "\n".join(lines) + "\n"

