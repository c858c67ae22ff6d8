"""GGUF files of every family, llama.cpp's block formats, and PEFT adapters on pretrained bases:
checked against gguf's own reader, tensor-name map and quantizers, and against peft itself."""

import dataclasses
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minigpt.cli.export import main as export_main
from minigpt.errors import UserInputError
from minigpt.families import tensor_table
from minigpt.gguf_file import (
    ARCHITECTURES, GGUF_FILE_NAME, LLAMA3_SPLIT, QWEN2_SPLIT, export_gguf, gguf_vocabulary, special_tokens_of,
    unpermute_from_gguf,
)
from minigpt.model import GPT
from minigpt.model_folder import FolderKind, load
from minigpt.quants import QUANTIZERS

PROMPT = [0, 17, 42, 7, 99, 5, 31, 64, 12, 8, 77, 3]


def field(reader, key):
    return reader.fields[key].contents()


def llama_cpp_compatible(model: GPT) -> GPT:
    """A Gemma 3 model laid out as llama.cpp's gemma3 fixes it (every 6th layer global, attention
    scaled by 1/sqrt(head_dim)) with the same weights; other families as they are."""
    config = model.config
    if config.family != "gemma3":
        return model
    layers = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(config.n_layer)]
    fitted = GPT(dataclasses.replace(config, layer_types=layers, query_pre_attn_scalar=float(config.head_dim)))
    fitted.load_state_dict(model.state_dict())
    return fitted.eval()


# ----------------------------------------------------------------------------- block formats


@pytest.mark.parametrize("outtype", ["q8_0", "q5_0", "q4_0"])
def test_block_formats_are_byte_equal_to_gguf_and_within_their_error(outtype):
    gguf = pytest.importorskip("gguf")
    ggml_type = getattr(gguf.GGMLQuantizationType, outtype.upper())
    data = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32) * 0.05
    data[0, :32] = 0  # an all-zero block: scale 0, no division by it
    data[1, 3], data[1, 9] = -0.7, 0.7  # the largest magnitude twice, opposite signs: the first one sets the scale
    data[2, 40:72] = np.linspace(-1, 1, 32)  # values on the rounding boundaries
    ours = QUANTIZERS[outtype](data)
    assert ours.dtype == np.uint8 and np.array_equal(ours, gguf.quants.quantize(data, ggml_type))
    back = gguf.quants.dequantize(ours, ggml_type).reshape(data.shape)
    levels = {"q8_0": 127, "q5_0": 16, "q4_0": 8}[outtype]
    step = np.abs(data.reshape(-1, 32)).max(axis=1, keepdims=True) / levels
    # Half a step from rounding; a full step where q4_0 / q5_0 clip the one value of largest
    # magnitude with the other sign (their range is one longer on the negative side); and the
    # float16 rounding of the scale, at most 2^-11 of it per level.
    bound = step * (1.0 if outtype != "q8_0" else 0.5) + step * levels * 2.0**-11
    assert (np.abs(back - data).reshape(-1, 32) <= bound + 1e-7).all()


# ----------------------------------------------------------------------------- each family's GGUF file


@pytest.fixture(scope="module")
def family_gguf(family_folders, tmp_path_factory):
    """{family: (the MiniGPT model exported, a GGUFReader of its f32 file)}."""
    gguf = pytest.importorskip("gguf")
    files = {}
    for family, folder in family_folders.items():
        model = llama_cpp_compatible(load(folder).model)
        output = tmp_path_factory.mktemp(f"gguf-{family}") / "out"
        export_gguf(model, load(folder).tokenizer, output, "f32")
        files[family] = (model, gguf.GGUFReader(output / GGUF_FILE_NAME))
    return files


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_each_family_is_written_as_its_llama_cpp_architecture(family_gguf, family):
    model, reader = family_gguf[family]
    config, arch = model.config, family
    assert field(reader, "general.architecture") == arch == ARCHITECTURES[family]
    expected = {f"{arch}.block_count": config.n_layer, f"{arch}.embedding_length": config.n_embd,
                f"{arch}.feed_forward_length": config.hidden_dim, f"{arch}.attention.head_count": config.n_head,
                f"{arch}.attention.head_count_kv": config.kv_heads, f"{arch}.context_length": config.block_size,
                f"{arch}.rope.freq_base": config.rope_theta, f"{arch}.rope.dimension_count": config.head_dim}
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config.norm_eps)
    if config.head_dim != config.n_embd // config.n_head:  # Qwen3 and Gemma 3 here
        assert field(reader, f"{arch}.attention.key_length") == field(reader, f"{arch}.attention.value_length") == config.head_dim
    else:
        assert f"{arch}.attention.key_length" not in reader.fields
    if family == "gemma3":
        assert field(reader, "gemma3.attention.sliding_window") == config.sliding_window
        assert field(reader, "gemma3.rope.freq_base_swa") == config.rope_local_theta
        assert field(reader, "gemma3.rope.scaling.type") == "linear" and field(reader, "gemma3.rope.scaling.factor") == 2.0


# family: (llama.cpp's tokenizer model, its pre-tokenizer name, {GGUF key: the token it names}, add_bos)
GGUF_TOKENIZERS = {
    "llama": ("gpt2", "llama-bpe", {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "eot": "<|end_of_text|>", "padding": "<|eot_id|>"}, True),
    "qwen2": ("gpt2", "qwen2", {"eos": "<|im_end|>", "eot": "<|endoftext|>", "padding": "<|endoftext|>"}, False),
    "qwen3": ("gpt2", "qwen2", {"eos": "<|im_end|>", "eot": "<|endoftext|>", "padding": "<|endoftext|>"}, False),
    "gemma3": ("llama", "default", {"bos": "<bos>", "eos": "<eos>", "eot": "<end_of_turn>", "padding": "<pad>", "unknown": "<unk>"}, True),
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_each_familys_own_tokenizer_is_written_with_its_model_and_special_ids(family_gguf, family_folders, family):
    """The folder's real tokenizer (byte-level BPE for Llama 3 and Qwen, SentencePiece-style for
    Gemma): llama.cpp's tokenizer model and pre-tokenizer, every token at its id, the special ids
    the folder gives, whether BOS is added, and the folder's chat template."""
    _, reader = family_gguf[family]
    tokenizer = load(family_folders[family]).tokenizer
    model, pre, specials, add_bos = GGUF_TOKENIZERS[family]
    assert field(reader, "tokenizer.ggml.model") == model and field(reader, "tokenizer.ggml.pre") == pre
    assert field(reader, "tokenizer.ggml.tokens") == [tokenizer.backend.id_to_token(index) for index in range(tokenizer.vocab_size)]
    written = {key: field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "eot", "padding", "unknown")
               if f"tokenizer.ggml.{key}_token_id" in reader.fields}
    assert written == {key: tokenizer.backend.token_to_id(token) for key, token in specials.items()}
    assert field(reader, "tokenizer.ggml.add_bos_token") is add_bos
    assert field(reader, "tokenizer.chat_template") == (family_folders[family] / "chat_template.jinja").read_text()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_each_familys_tensors_have_llama_cpp_names_shapes_and_values(family_gguf, family_folders, family):
    """Names as gguf's own tensor map gives them for the Hugging Face names; values as MiniGPT's,
    q/k un-permuted for llama only, Gemma's norms stored as 1 + w."""
    gguf = pytest.importorskip("gguf")
    model, reader = family_gguf[family]
    config = model.config
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[family].upper())
    name_map = gguf.get_tensor_name_map(arch, config.n_layer)
    allowed = {gguf.TENSOR_NAMES[tensor] for tensor in gguf.MODEL_TENSORS[arch]}
    stored = {tensor.name: tensor for tensor in reader.tensors}
    state = model.state_dict()
    for row in tensor_table(config):
        assert name_map.get_name(row.hf, try_suffixes=(".weight", ".bias")) == row.gguf
        assert re.sub(r"^blk\.\d+\.", "blk.{bid}.", row.gguf.rsplit(".", 1)[0]) in allowed  # a tensor the architecture has
        tensor = stored.pop(row.gguf)
        assert tuple(int(size) for size in reversed(tensor.shape)) == row.shape
        data = torch.from_numpy(np.array(tensor.data).reshape(row.shape))
        expected = state[row.minigpt]
        if family == "llama" and row.gguf.endswith(("attn_q.weight", "attn_k.weight")):
            data = unpermute_from_gguf(data, config.n_head if "attn_q" in row.gguf else config.kv_heads)
        if family == "gemma3" and row.gguf.endswith("norm.weight"):
            expected = 1 + expected
        assert torch.equal(data, expected), row.gguf
    if family == "llama":  # Llama 3's rope scaling: llama.cpp divides each frequency by these factors
        factors = torch.from_numpy(np.array(stored.pop("rope_freqs.weight").data))
        transformers = pytest.importorskip("transformers")
        hf_config = transformers.AutoConfig.from_pretrained(family_folders["llama"])
        scaled, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
        plain = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
        torch.testing.assert_close(plain / factors, scaled, rtol=1e-5, atol=0)
    assert not stored  # nothing written that the table does not list


def test_a_gemma3_layout_llama_cpp_would_compute_otherwise_is_refused(family_folders, tmp_path, capsys):
    # The fixture's Gemma 3 has a global middle layer and query_pre_attn_scalar 24 != head_dim 32.
    assert export_main([str(family_folders["gemma3"]), "--format", "gguf", "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "llama.cpp's gemma3" in error and error.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("outtype", ["q5_0", "q4_0"])
def test_q5_0_and_q4_0_files_keep_the_embedding_q8_0_and_stay_within_the_format(family_folders, tmp_path, outtype):
    gguf = pytest.importorskip("gguf")
    output = tmp_path / "out"
    assert export_main([str(family_folders["qwen2"]), "--format", "gguf", "--outtype", outtype, "--output", str(output)]) == 0
    reader = gguf.GGUFReader(output / GGUF_FILE_NAME)
    assert field(reader, "general.file_type") == getattr(gguf.LlamaFileType, f"MOSTLY_{outtype.upper()}")
    state = load(family_folders["qwen2"]).model.state_dict()
    for row in tensor_table(load(family_folders["qwen2"]).model.config):
        tensor = next(tensor for tensor in reader.tensors if tensor.name == row.gguf)
        expected = {1: "F32", 2: "Q8_0" if row.gguf.startswith("token_embd") else outtype.upper()}[len(row.shape)]
        assert tensor.tensor_type.name == expected, row.gguf
        back = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(row.shape).copy())
        original = state[row.minigpt]
        step = original.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 8 if len(row.shape) == 2 else 0
        assert ((back - original).reshape(-1, 32 if len(row.shape) == 2 else 1).abs() <= step * 1.01 + 1e-7).all(), row.gguf


# ----------------------------------------------------------------------------- tokenizers


def test_byte_level_pre_tokenizers_are_named_for_llama_cpp_or_refused():
    pytest.importorskip("gguf")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    def vocabulary_with(pre_tokenizer):
        backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
        backend.pre_tokenizer, backend.decoder = pre_tokenizer, decoders.ByteLevel()
        return gguf_vocabulary(SimpleNamespace(backend=backend), 3)

    def split_then_bytes(pattern):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    assert vocabulary_with(pre_tokenizers.ByteLevel(add_prefix_space=False)).pre == "gpt-2"
    assert vocabulary_with(split_then_bytes(LLAMA3_SPLIT)).pre == "llama-bpe"
    assert vocabulary_with(split_then_bytes(QWEN2_SPLIT)).pre == "qwen2"
    vocabulary = vocabulary_with(pre_tokenizers.ByteLevel(add_prefix_space=False))
    assert vocabulary.model == "gpt2" and vocabulary.merges == ["a b"]
    with pytest.raises(UserInputError, match="Split \\+ ByteLevel.*convert_hf_to_gguf"):
        vocabulary_with(split_then_bytes(r"\w+|\s+"))


def spm_tokenize(text: str, vocabulary, prefix: bool) -> list[int]:
    """llama.cpp's SentencePiece-style tokenizer in a few lines: spaces become ▁, then the adjacent
    pair whose concatenation is a token of the highest score merges, until none is; characters
    without a token fall back to their UTF-8 bytes (<0xNN>)."""
    ids = {token: index for index, token in enumerate(vocabulary.tokens)}
    symbols = list(("▁" if prefix else "") + text.replace(" ", "▁"))
    while True:
        pairs = [(vocabulary.scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return [index for symbol in symbols for index in
            ([ids[symbol]] if symbol in ids else [ids[f"<0x{byte:02X}>"] for byte in symbol.encode()])]


def test_a_sentencepiece_style_tokenizer_becomes_llama_cpps_llama_model_with_merge_order_scores():
    """Scores are minus the merge rank, so llama.cpp's merge-the-best-scoring-pair tokenizer
    splits text exactly as Hugging Face's BPE does (checked with llama.cpp's algorithm, above)."""
    pytest.importorskip("gguf")
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")  # Gemma's way: no ▁ put before the text
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    corpus = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "mathematics at the atelier"] * 20
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    bytes_ = [f"<0x{byte:02X}>" for byte in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials + bytes_, show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    vocabulary = gguf_vocabulary(SimpleNamespace(backend=backend), backend.get_vocab_size())
    gguf = pytest.importorskip("gguf")
    assert vocabulary.model == "llama" and vocabulary.merges is None and not vocabulary.add_space_prefix
    assert vocabulary.token_types[:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN] and vocabulary.unknown == 3
    assert vocabulary.token_types[4 + 0x41] == gguf.TokenType.BYTE and vocabulary.tokens[4 + 0x41] == "<0x41>"
    for text in ["the cat sat on the mat", "a dog at the atelier", "mathematical cats", "zebra ✓ 中文"]:
        assert spm_tokenize(text, vocabulary, prefix=False) == backend.encode(text).ids, text


def test_a_base_model_folder_without_a_template_writes_no_chat_template(family_folders, tmp_path):
    """A base model's folder (no chat template): no tokenizer.chat_template, BOS still the folder's."""
    import shutil

    folder = shutil.copytree(family_folders["gemma3"], tmp_path / "base")
    (folder / "chat_template.jinja").unlink()
    special = special_tokens_of(load(folder).tokenizer)
    assert special.chat_template is None and special.bos == 2 and special.add_bos


# ----------------------------------------------------------------------------- PEFT adapters on pretrained bases


@pytest.fixture(scope="module")
def peft_adapters(family_folders, tmp_path_factory):
    """{family: (a PEFT LoRA adapter folder saved by peft itself, the PeftModel)} on the llama and qwen2 bases."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    adapters = {}
    for family in ("llama", "qwen2"):
        base = transformers.AutoModelForCausalLM.from_pretrained(family_folders[family], dtype=torch.float32)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
        adapted = peft.get_peft_model(base, config)
        torch.manual_seed(3)
        with torch.no_grad():
            for name, parameter in adapted.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)  # B starts at zero: move it so the adapter changes the model
        folder = tmp_path_factory.mktemp(f"peft-{family}") / "adapter"
        adapted.save_pretrained(folder)
        record = json.loads((folder / "adapter_config.json").read_text())
        assert record["base_model_name_or_path"] == str(family_folders[family])  # peft records the folder it loaded
        adapters[family] = (folder, adapted.eval())
    return adapters


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_peft_adapter_on_a_pretrained_base_gives_peft_s_logits(peft_adapters, family):
    folder, adapted = peft_adapters[family]
    loaded = load(folder, merge_adapter=False)
    assert loaded.kind is FolderKind.LORA_ADAPTER and loaded.adapter.config.rank == 4
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        theirs = adapted(ids).logits
        base = adapted.get_base_model()
        with adapted.disable_adapter():
            base_logits = base(ids).logits
        assert (theirs - base_logits).abs().max() > 1e-3  # the adapter is on
        assert (loaded.model(ids)[0] - theirs).abs().max().item() < 1e-4
        assert (load(folder).model(ids)[0] - theirs).abs().max().item() < 1e-4  # merged


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_peft_adapters_merged_export_equals_base_plus_adapter(peft_adapters, tmp_path, family):
    transformers = pytest.importorskip("transformers")
    folder, adapted = peft_adapters[family]
    assert export_main([str(folder), "--merge", "--format", "hf", "--output", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert (merged(ids).logits - adapted(ids).logits).abs().max().item() < 1e-4
    assert export_main([str(folder), "--format", "peft", "--output", str(tmp_path / "again")]) == 0
    from safetensors.torch import load_file

    original, again = load_file(str(folder / "adapter_model.safetensors")), load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert set(again) == set(original) and all(torch.equal(again[name], original[name]) for name in original)


def test_a_minigpt_lora_run_on_a_pretrained_base_exports_for_peft_and_merged_to_gguf(family_folders, tmp_path):
    """A LoRA run on the Qwen2 base (biases stay the base's): PEFT computes the same on that
    folder, and the merged GGUF holds W + (alpha / r) B A."""
    gguf, peft = pytest.importorskip("gguf"), pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from minigpt.checkpoint import write_model_files
    from minigpt.lora import LoRAConfig, apply_lora, lora_parameters
    from minigpt.model_folder import AdapterRun

    base_folder = family_folders["qwen2"]
    loaded = load(base_folder)
    lora = LoRAConfig(rank=2, alpha=6.0, targets=("q", "v", "down"))
    model = apply_lora(loaded.model, lora)
    torch.manual_seed(4)
    with torch.no_grad():
        for parameter in lora_parameters(model):
            parameter.normal_(0, 0.1)
    adapter = AdapterRun.start(lora, base_folder).save(tmp_path / "run" / "final_model", model,
                                                      lambda directory: write_model_files(directory, loaded.config, loaded.tokenizer))
    assert export_main([str(adapter), "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert (adapted(ids).logits - model(ids)[0]).abs().max().item() < 1e-4

    assert export_main([str(adapter), "--merge", "--format", "gguf", "--outtype", "f32", "--output", str(tmp_path / "gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "gguf" / GGUF_FILE_NAME)
    stored = {tensor.name: np.array(tensor.data) for tensor in reader.tensors}
    merged = load(adapter).model.state_dict()
    for row in tensor_table(loaded.model.config):
        assert torch.equal(torch.from_numpy(stored[row.gguf].reshape(row.shape)), merged[row.minigpt]), row.gguf
    q = model.blocks[0].attention.q_proj
    expected = q.base.weight + lora.scale * q.lora_B.weight @ q.lora_A.weight
    torch.testing.assert_close(torch.from_numpy(stored["blk.0.attn_q.weight"].reshape(expected.shape)), expected, atol=1e-6, rtol=0)
