"""Export to Hugging Face, GGUF and PEFT, import from Hugging Face: checked against transformers, gguf and peft themselves."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import optional, run_script
from minigpt.checkpoint import write_model_files
from minigpt.cli.export import main as export_main
from minigpt.config import ModelConfig, RunConfig
from minigpt.errors import UserInputError
from minigpt.export import (
    EXPORT_MARKER,
    CHAT_TEMPLATE,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    export_hf,
)
from minigpt.families import tensor_table
from minigpt.gguf_file import GGUF_FILE_NAME, permute_for_gguf, unpermute_from_gguf
from minigpt.lora import LoRAConfig, apply_lora, lora_parameters
from minigpt.model import GPT, apply_rotary, rotary_tables
from minigpt.model_folder import AdapterRun, load, save_model_directory
from minigpt.tokenizer import PretrainedTokenizer, load_tokenizer, train_char_tokenizer

transformers = optional("transformers")  # each test that uses one skips without it (fails under CI=true)
gguf = optional("gguf")
peft = optional("peft")

TRICKY_TEXTS = [
    "Hello, world!",
    "   leading spaces and trailing   ",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "中文 日本語 한국어",
    "combining: e\u0301 n\u0303 Zalgo Z\u0351\u0352\u0353",
    "windows\r\nline\r\nends\n\n\ttabs",
    "<|im_start|>user\nliteral specials<|im_end|><|endoftext|><|pad|>",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 😀 in 中文?"},
]


def small_config(vocab_size: int, **overrides) -> ModelConfig:
    values = dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, rope_theta=500.0)
    return ModelConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    return load_tokenizer(tokenizer_file)


@pytest.fixture(scope="module")
def trained(tokenizer, corpus_jsonl):
    """A tiny model trained for a few dozen AdamW steps (weights well away from their init)."""
    torch.manual_seed(0)
    model = GPT(small_config(tokenizer.vocab_size))
    losses = train_briefly(model, torch.optim.AdamW(model.parameters(), lr=3e-3), tokenizer, corpus_jsonl, slice(0, 20), 40)
    assert losses[-1] < losses[0] - 1.0  # it learned something
    return model.eval()


def train_briefly(model, optimizer, tokenizer, corpus_jsonl, documents: slice, steps: int) -> list[float]:
    """`steps` AdamW steps on random 32-token windows of some of the corpus' documents; the losses."""
    text = " ".join(json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines()[documents])
    data = torch.tensor(tokenizer.encode(text))
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,))
        batch = torch.stack([data[start : start + 33] for start in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def model_dir(trained, tokenizer, tmp_path_factory):
    return save_model_directory(tmp_path_factory.mktemp("run") / "final_model", trained, RunConfig(model=trained.config), tokenizer)


@pytest.fixture(scope="module")
def hf_dir(model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "hf"
    assert export_main([str(model_dir), "--format", "hf", "--output", str(output)]) == 0
    return output


def sample_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("The model reads this sentence, and then 😀 some more text to fill the context.")])


def test_hf_export_loads_in_transformers_with_equal_logits(hf_dir, trained, tokenizer):
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["rope_theta"] == 500.0 and config["num_key_value_heads"] == 2 and config["tie_word_embeddings"]
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()  # tied in transformers too
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        ours, _ = trained(ids)
        theirs = hf_model(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_id, tokenizer.im_end_id]


def test_hf_tokenizer_matches_minigpt_on_tricky_text(hf_dir, tokenizer):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in TRICKY_TEXTS:
        ids = tokenizer.encode(text)
        assert hf_tokenizer(text)["input_ids"] == ids, text
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id and hf_tokenizer.pad_token_id == tokenizer.pad_id


def test_hf_chat_template_renders_like_minigpt(hf_dir, tokenizer):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    expected = tokenizer.chat_prompt(CONVERSATION)
    assert hf_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False) == tokenizer.decode(expected)
    assert hf_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False) == expected
    assert (hf_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


@pytest.mark.requires("gguf")  # through MiniGPT's GGUF export
def test_character_tokenizer_model_exports_to_hf_and_is_refused_by_gguf(tmp_path, capsys):
    texts = ["To be, or not to be: that is the question.\r\n", "Whether 'tis nobler in the mind"]
    char_tokenizer = train_char_tokenizer(texts, show_progress=False)
    model = GPT(small_config(char_tokenizer.vocab_size, n_layer=1))
    model_dir = save_model_directory(tmp_path / "char_model", model, RunConfig(model=model.config), char_tokenizer)
    assert export_main([str(model_dir), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["To be: the question.\r\n", "unseen ✓ chars<|im_end|>", "  "]:
        assert hf_tokenizer(text)["input_ids"] == char_tokenizer.encode(text), text
        assert hf_tokenizer.decode(char_tokenizer.encode(text)) == char_tokenizer.decode(char_tokenizer.encode(text))
    assert export_main([str(model_dir), "--format", "gguf", "--output", str(tmp_path / "gguf")]) == 2
    assert "character" in capsys.readouterr().err and not (tmp_path / "gguf").exists()


def test_gguf_permutation_turns_rotate_half_into_interleaved_pairs():
    """Rotating q = W x the rotate-half way equals rotating (P W) x the interleaved way, up to the same row order P."""
    heads, head_dim, width, length = 2, 8, 16, 5
    weight, x = torch.randn(heads * head_dim, width), torch.randn(length, width)
    cos, sin = rotary_tables(head_dim, length, theta=100.0)
    rotate_half = apply_rotary((x @ weight.T).view(length, heads, head_dim).transpose(0, 1), cos, sin)

    pairs = (x @ permute_for_gguf(weight, heads).T).view(length, heads, head_dim // 2, 2).transpose(0, 1)
    angle_cos, angle_sin = cos[:, : head_dim // 2], sin[:, : head_dim // 2]  # pair i turns at frequency i
    even, odd = pairs[..., 0], pairs[..., 1]
    interleaved = torch.stack([even * angle_cos - odd * angle_sin, even * angle_sin + odd * angle_cos], dim=-1)
    back = unpermute_from_gguf(interleaved.transpose(0, 1).reshape(length, heads * head_dim).T, heads).T
    assert torch.allclose(back.view(length, heads, head_dim).transpose(0, 1), rotate_half, atol=1e-6)
    assert torch.equal(unpermute_from_gguf(permute_for_gguf(weight, heads), heads), weight)


def read_gguf(model_dir, tmp_path, outtype):
    output = tmp_path / f"gguf-{outtype}"
    assert export_main([str(model_dir), "--format", "gguf", "--outtype", outtype, "--output", str(output)]) == 0
    return output, gguf.GGUFReader(output / GGUF_FILE_NAME)


def field_value(reader, key):
    return reader.fields[key].contents()


def gguf_tensors_as_minigpt(reader, config):
    """GGUF tensors dequantised to float32 and un-permuted, under MiniGPT's names."""
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    result = {}
    for row in tensor_table(config):
        name = row.gguf
        tensor = by_name[name]
        assert tuple(int(size) for size in reversed(tensor.shape)) == row.shape  # GGUF lists dimensions innermost first
        data = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(row.shape).copy())
        if name.endswith("attn_q.weight"):
            data = unpermute_from_gguf(data, config.n_head)
        elif name.endswith("attn_k.weight"):
            data = unpermute_from_gguf(data, config.kv_heads)
        result[row.minigpt] = (data, tensor.tensor_type)
    return result


@pytest.mark.requires("gguf")  # through MiniGPT's GGUF export
def test_gguf_f32_holds_every_llama_key_and_the_exact_weights(model_dir, trained, tokenizer, tmp_path):
    output, reader = read_gguf(model_dir, tmp_path, "f32")
    config = trained.config
    expected = {
        "general.architecture": "llama", "llama.context_length": 64, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": config.hidden_dim, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 500.0, "llama.rope.dimension_count": 16, "llama.vocab_size": tokenizer.vocab_size,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.padding_token_id": 3, "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {key: field_value(reader, key) for key in expected} == expected
    assert field_value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.norm_eps)
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    assert tokens[:4] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"] and len(tokens) == tokenizer.vocab_size
    assert field_value(reader, "tokenizer.ggml.token_type")[:5] == [3, 3, 3, 3, 1]  # CONTROL x4, then NORMAL
    assert len(field_value(reader, "tokenizer.ggml.merges")) == tokenizer.vocab_size - 256 - 4
    state = trained.state_dict()
    tensors = gguf_tensors_as_minigpt(reader, config)
    assert "output.weight" not in {tensor.name for tensor in reader.tensors}  # tied: llama.cpp reuses token_embd
    for name, (data, _) in tensors.items():
        assert torch.equal(data, state[name]), name
    modelfile = (output / "Modelfile").read_text()
    assert f"FROM ./{GGUF_FILE_NAME}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile and "<|im_start|>assistant" in modelfile


@pytest.mark.requires("gguf")  # through MiniGPT's GGUF export
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gguf_f16_and_q8_0_stay_within_the_format_error(model_dir, trained, tmp_path, outtype):
    _, reader = read_gguf(model_dir, tmp_path, outtype)
    state = trained.state_dict()
    for name, (data, ggml_type) in gguf_tensors_as_minigpt(reader, trained.config).items():
        original = state[name]
        if original.dim() == 1:  # norms stay float32
            assert ggml_type == gguf.GGMLQuantizationType.F32 and torch.equal(data, original)
        elif outtype == "f16":
            assert ggml_type == gguf.GGMLQuantizationType.F16
            assert torch.equal(data, original.half().float())
        else:
            # q8_0: each block of 32 shares one scale absmax/127 and rounds to the nearest step,
            # so no value moves by more than half a step (plus the float16 rounding of the scale).
            assert ggml_type == gguf.GGMLQuantizationType.Q8_0
            blocks_original, blocks_data = original.reshape(-1, 32), data.reshape(-1, 32)
            step = blocks_original.abs().amax(dim=1, keepdim=True) / 127
            assert ((blocks_data - blocks_original).abs() <= step * 0.5 + step * 127 * 1e-3).all(), name


def hf_llama_folder(tokenizer, tokenizer_file, folder, tie: bool):
    """A random transformers LlamaForCausalLM saved as a Hugging Face folder with MiniGPT's tokenizer."""
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=20000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=3,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file)).save_pretrained(folder)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_import_hf_llama_matches_transformers_and_round_trips(tokenizer, tokenizer_file, tmp_path, tie):
    hf_model = hf_llama_folder(tokenizer, tokenizer_file, tmp_path / "hf", tie)
    imported = load(tmp_path / "hf")
    model, imported_tokenizer, config = imported.model, imported.tokenizer, imported.config
    assert config.model.rope_theta == 20000.0 and config.model.tie_embeddings == tie and config.model.norm_eps == 1e-6
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        assert (model(ids)[0] - hf_model(ids).logits).abs().max().item() < 1e-4
    assert imported_tokenizer.encode(TRICKY_TEXTS[2]) == tokenizer.encode(TRICKY_TEXTS[2])

    export_hf(model, imported_tokenizer, tmp_path / "again")
    original, again = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(again) == set(original) - ({"lm_head.weight"} if tie else set())
    for name, tensor in again.items():
        assert tensor.dtype == original[name].dtype and tensor.numpy().tobytes() == original[name].numpy().tobytes(), name


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"attention_bias": True}, "biases"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope scaling"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"hidden_act": "gelu"}, "silu"),
        ({"model_type": "mistral"}, "'mistral' model"),
    ],
)
def test_import_refuses_what_minigpt_cannot_represent(hf_dir, tmp_path, change, phrase):
    folder = shutil.copytree(hf_dir, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserInputError, match=phrase):
        load(folder)


def test_import_reads_a_tokenizer_without_minigpt_special_tokens_as_the_folders_own(hf_dir, tmp_path):
    """Special tokens elsewhere than ids 0-3: a pretrained folder's tokenizer (issue #27), not refused."""
    folder = shutil.copytree(hf_dir, tmp_path / "hf")
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    size = len(vocab)
    for offset, token in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")):  # swapped with the last ids
        moved = next(name for name, index in vocab.items() if index == size - 1 - offset)
        vocab[token], vocab[moved] = size - 1 - offset, vocab[token]
    for added in tokenizer_json["added_tokens"]:
        added["id"] = vocab[added["content"]]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    tokenizer = load(folder).tokenizer
    assert isinstance(tokenizer, PretrainedTokenizer) and tokenizer.eos_id == size - 1
    assert tokenizer.chat_prompt([{"role": "user", "content": "hi"}])[0] == size - 2  # <|im_start|>, by the exported template


@pytest.mark.requires("gguf")  # through MiniGPT's GGUF export
def test_existing_output_is_refused_without_force(model_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert export_main([str(model_dir), "--format", "hf", "--output", str(output)]) == 0
    assert export_main([str(model_dir), "--format", "hf", "--output", str(output)]) == 2
    assert "--force" in capsys.readouterr().err
    assert export_main([str(model_dir), "--format", "hf", "--outtype", "q8_0", "--output", str(output), "--force"]) == 2
    assert "--outtype" in capsys.readouterr().err and (output / "config.json").is_file()
    assert export_main([str(model_dir), "--format", "gguf", "--outtype", "q8_0", "--output", str(output), "--force"]) == 0
    assert sorted(path.name for path in output.iterdir()) == [EXPORT_MARKER, "Modelfile", GGUF_FILE_NAME]
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written left behind


def test_force_replaces_only_an_earlier_export(model_dir, tmp_path, capsys, monkeypatch):
    """--force never deletes what an export did not write: a folder of the user's, a file, the
    folder holding the model being exported, the current directory or one of its parents."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    runs = model_dir.parent  # <run>/final_model: the run's folder holds the source
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    (work / "notes.txt").write_text("mine")
    for output, phrase in [(mine, "not written by minigpt export"), (mine / "keep.txt", "is a file"), (runs, "holds the model"),
                           (model_dir, "holds the model"), (Path("."), "current directory"), (Path(".."), "current directory")]:
        assert export_main([str(model_dir), "--format", "hf", "--output", str(output), "--force"]) == 2, output
        message = capsys.readouterr().err.strip()
        assert phrase in message and "\n" not in message and "Traceback" not in message, message
    assert (mine / "keep.txt").read_text() == "mine" and (work / "notes.txt").read_text() == "mine"
    assert (model_dir / "model.safetensors").is_file() and not list(tmp_path.rglob(".tmp-*"))


def test_script_reports_a_bad_model_path_in_one_line(tmp_path):
    result = run_script("export.py", str(tmp_path / "missing"), "--format", "hf", "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- LoRA adapters: PEFT and --merge


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tokenizer, corpus_jsonl, tmp_path_factory):
    """A LoRA run's final_model/ on the trained base: rank 4 on every target, trained a few steps (B is not zero)."""
    torch.manual_seed(2)
    base = load(model_dir)
    model, run_config = base.model, base.config
    apply_lora(model.train(), LoRAConfig(rank=4, alpha=12.0, targets=("q", "k", "v", "o", "gate", "up", "down")))
    train_briefly(model, torch.optim.AdamW(lora_parameters(model), lr=1e-2), tokenizer, corpus_jsonl, slice(20, 40), 15)
    run = AdapterRun.start(LoRAConfig(rank=4, alpha=12.0), model_dir)
    return run.save(tmp_path_factory.mktemp("lora") / "final_model", model, lambda directory: write_model_files(directory, run_config, tokenizer))


def adapter_logits(adapter_dir, ids) -> torch.Tensor:
    """MiniGPT's base + adapter (unmerged), float32."""
    model = load(adapter_dir, merge_adapter=False).model
    with torch.no_grad():
        return model(ids)[0]


def test_peft_export_loads_in_peft_with_equal_logits(adapter_dir, hf_dir, trained, tokenizer, tmp_path):
    output = tmp_path / "peft"
    assert export_main([str(adapter_dir), "--format", "peft", "--output", str(output)]) == 0
    assert sorted(path.name for path in output.iterdir()) == [EXPORT_MARKER, PEFT_CONFIG, PEFT_WEIGHTS]
    config = json.loads((output / PEFT_CONFIG).read_text())
    assert {key: config[key] for key in ("peft_type", "task_type", "r", "lora_alpha", "bias", "fan_in_fan_out", "use_rslora")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 12.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
    }
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["base_model_name_or_path"] is None  # the base is a MiniGPT folder, which transformers cannot load
    names = set(load_file(str(output / PEFT_WEIGHTS)))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names and len(names) == 2 * 7 * trained.config.n_layer

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    adapted = peft.PeftModel.from_pretrained(base, output).eval()
    ids = sample_ids(tokenizer)
    ours = adapter_logits(adapter_dir, ids)
    with torch.no_grad():
        theirs = adapted(ids).logits
        base_logits = trained(ids)[0]
    assert (ours - base_logits).abs().max().item() > 0.1  # the adapter changes the model: B is not zero
    assert (ours - theirs).abs().max().item() < 1e-4


def test_peft_export_records_a_checked_hf_base(adapter_dir, hf_dir, tokenizer, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # AutoPeftModel would otherwise ask the Hub for a tokenizer
    output = tmp_path / "peft"
    assert export_main([str(adapter_dir), "--format", "peft", "--hf-base", str(hf_dir), "--output", str(output)]) == 0
    assert json.loads((output / PEFT_CONFIG).read_text())["base_model_name_or_path"] == str(hf_dir)
    adapted = peft.AutoPeftModelForCausalLM.from_pretrained(output).eval()  # finds the base through that record
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        assert (adapter_logits(adapter_dir, ids) - adapted(ids).logits).abs().max().item() < 1e-4

    other = shutil.copytree(hf_dir, tmp_path / "other")
    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert export_main([str(adapter_dir), "--format", "peft", "--hf-base", str(other), "--output", str(tmp_path / "wrong")]) == 2
    assert "does not hold the adapter's base model" in capsys.readouterr().err and not (tmp_path / "wrong").exists()


def test_peft_export_of_a_lora_on_an_imported_hf_folder_records_that_folder(hf_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # AutoPeftModel would otherwise ask the Hub for a tokenizer
    base = load(hf_dir)  # imported from Hugging Face
    model, run_config = base.model, base.config
    apply_lora(model, LoRAConfig(rank=2, targets=("q", "v")))
    for parameter in lora_parameters(model):
        torch.nn.init.normal_(parameter, std=0.2)
    run = AdapterRun.start(LoRAConfig(rank=2, targets=("q", "v")), hf_dir)
    adapter = run.save(tmp_path / "final_model", model, lambda directory: write_model_files(directory, run_config, tokenizer))
    assert export_main([str(adapter), "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(hf_dir) and config["target_modules"] == ["q_proj", "v_proj"]
    adapted = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        assert (model.eval()(ids)[0] - adapted(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.requires("gguf")  # through MiniGPT's GGUF export
def test_merge_exports_base_plus_adapter_as_one_model(adapter_dir, tokenizer, tmp_path, outtype):
    hf_output, gguf_output = tmp_path / "merged-hf", tmp_path / "merged-gguf"
    if outtype == "f32":
        assert export_main([str(adapter_dir), "--format", "hf", "--merge", "--output", str(hf_output)]) == 0
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_output)
        ids = sample_ids(tokenizer)
        with torch.no_grad():
            assert (adapter_logits(adapter_dir, ids) - hf_model(ids).logits).abs().max().item() < 1e-4
    assert export_main([str(adapter_dir), "--format", "gguf", "--outtype", outtype, "--merge", "--output", str(gguf_output)]) == 0
    merged = load(adapter_dir).model  # merged on load
    state, reader = merged.state_dict(), gguf.GGUFReader(gguf_output / GGUF_FILE_NAME)
    for name, (data, _) in gguf_tensors_as_minigpt(reader, merged.config).items():
        step = state[name].abs().max() / 127 if outtype == "q8_0" and state[name].dim() == 2 else 0
        assert (data - state[name]).abs().max() <= step, name  # f32: exact; q8_0: within a step of the tensor's largest


@pytest.mark.parametrize(
    ("arguments", "phrase"),
    [
        (["--format", "hf"], "--merge"),  # an adapter is not a whole model
        (["--format", "gguf"], "--format peft"),
        (["--format", "peft", "--merge"], "drop --merge"),
        (["--format", "hf", "--merge", "--outtype", "f16"], "--outtype"),
        (["--format", "hf", "--merge", "--hf-base", "x"], "--hf-base"),
        (["--format", "peft", "--hf-base", "missing-folder"], "not a Hugging Face model folder"),
    ],
)
def test_adapter_export_refusals(adapter_dir, tmp_path, capsys, arguments, phrase):
    assert export_main([str(adapter_dir), *arguments, "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert phrase in error and error.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arguments", "phrase"), [(["--format", "peft"], "not a LoRA adapter"), (["--format", "hf", "--merge"], "drop --merge")])
def test_a_whole_model_has_no_adapter_to_export_or_merge(model_dir, tmp_path, capsys, arguments, phrase):
    assert export_main([str(model_dir), *arguments, "--output", str(tmp_path / "out")]) == 2
    assert phrase in capsys.readouterr().err and not (tmp_path / "out").exists()
