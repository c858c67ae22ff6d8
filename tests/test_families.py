"""Pretrained families (minigpt/families.py) in MiniGPT's one model, checked against transformers itself:
logits, greedy decoding with the KV cache, bf16 and sharded folders, the hf export round trip, refusals."""

import dataclasses
import json
import shutil

import pytest
import torch

from minigpt.cli.export import main as export_main
from minigpt.config import ModelConfig, RunConfig, validate
from minigpt.engine import Engine, Request, SamplingConfig
from minigpt.errors import UserInputError
from minigpt.families import FAMILIES, SUPPORTED, load_model, model_config, read_config
from minigpt.model_folder import FolderKind, load

transformers = pytest.importorskip("transformers")

FAMILY_NAMES = list(FAMILIES)
PROMPT_LENGTH = 24  # longer than the Gemma fixture's 4-token window, so its local layers cut


def transformers_model(folder, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def prompt_ids(vocab_size: int, rows: int = 2, length: int = PROMPT_LENGTH) -> torch.Tensor:
    return torch.randint(4, vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_equal_transformers_in_float32(family_folders, family):
    folder = family_folders[family]
    loaded = load(folder)
    assert loaded.kind is FolderKind.HUGGING_FACE and loaded.model.config.family == family
    ids = prompt_ids(loaded.model.config.vocab_size)
    with torch.no_grad():
        difference = (loaded.model(ids)[0] - transformers_model(folder)(ids).logits).abs().max().item()
    print(f"{family}: max logits difference {difference:.2e}")
    assert difference < 1e-4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_decoding_with_the_kv_cache_equals_transformers_generate(family_folders, family):
    """Two rows of different lengths decoded together through MiniGPT's engine (KV cache, per-row
    positions and masks; for Gemma, local layers that must forget keys past the window) give the
    tokens transformers' own greedy generate gives for each prompt alone."""
    folder = family_folders[family]
    model = load(folder).model
    ids = prompt_ids(model.config.vocab_size)
    prompts = [ids[0].tolist(), ids[1, :PROMPT_LENGTH - 7].tolist()]
    engine = Engine(model)
    rows = {engine.add(Request(prompt, SamplingConfig(max_new_tokens=8, temperature=0))): [] for prompt in prompts}
    while engine.has_work:
        for event in engine.step():
            rows[event.row].append(event.token)
    hf_model = transformers_model(folder)
    for prompt, tokens in zip(prompts, rows.values()):
        expected = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                     pad_token_id=3, eos_token_id=None)[0, len(prompt):].tolist()
        assert tokens == expected


def test_a_bfloat16_folder_loads_without_a_float32_copy(family_folders, tmp_path):
    folder = tmp_path / "gemma3-bf16"
    transformers_model(family_folders["gemma3"], torch.bfloat16).save_pretrained(folder)
    kept = load_model(folder, dtype=None)
    assert {parameter.dtype for parameter in kept.parameters()} == {torch.bfloat16}
    widened = load_model(folder)
    assert {parameter.dtype for parameter in widened.parameters()} == {torch.float32}
    for (name, narrow), (_, wide) in zip(kept.state_dict().items(), widened.state_dict().items()):
        assert torch.equal(narrow.float(), wide), name
    assert kept.lm_head.weight is kept.token_embedding.weight  # tied, after loading in place
    ids = prompt_ids(kept.config.vocab_size)
    with torch.no_grad():  # bfloat16 against bfloat16: the same roundings, within bfloat16's precision
        difference = (kept(ids)[0].float() - transformers_model(folder, torch.bfloat16)(ids).logits.float()).abs().max().item()
    assert difference < 0.1


def test_a_sharded_folder_loads_like_one_file(family_folders, tmp_path):
    folder = tmp_path / "llama-sharded"
    transformers_model(family_folders["llama"]).save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*.safetensors"))) > 2
    sharded, whole = load_model(folder).state_dict(), load_model(family_folders["llama"]).state_dict()
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[name], whole[name]) for name in whole)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copyfile(family_folders["llama"] / name, folder / name)
    assert load(folder).kind is FolderKind.HUGGING_FACE


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_hf_export_round_trip_keeps_the_class_the_files_and_the_logits(family_folders, family, tmp_path):
    source = family_folders[family]
    assert export_main([str(source), "--format", "hf", "--output", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    written, original = json.loads((out / "config.json").read_text()), json.loads((source / "config.json").read_text())
    assert written["architectures"] == original["architectures"] and written["model_type"] == original["model_type"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert read_config(out) == read_config(source)  # the transformers 4 spelling export writes reads back the same
    exported = transformers_model(out)
    assert type(exported).__name__ == FAMILIES[family].architecture
    ids = prompt_ids(exported.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, transformers_model(source)(ids).logits)


def test_transformers_4_spelling_reads_like_transformers_5(family_folders):
    """Gemma 3's rope settings as transformers 4 wrote them (rope_theta, rope_scaling for global
    layers, rope_local_base_freq, sliding_window_pattern) give the ModelConfig of transformers 5's rope_parameters."""
    newer = json.loads((family_folders["gemma3"] / "config.json").read_text())
    older = {key: value for key, value in newer.items() if key not in ("rope_parameters", "layer_types")}
    older.update({"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
                  "sliding_window_pattern": 2})
    assert model_config(older, "older") == model_config(newer, "newer")


def changed(folder, change: dict) -> dict:
    return {**json.loads((folder / "config.json").read_text()), **change}


@pytest.mark.parametrize(
    ("family", "change", "phrase"),
    [
        ("llama", {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "is a 'mistral' model"),
        ("qwen2", {"architectures": ["Qwen2ForSequenceClassification"]}, "not a Qwen2ForCausalLM"),
        ("gemma3", {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "vision tower"),
        ("qwen3", {"model_type": "qwen3_moe", "num_experts": 8}, "mixture of experts"),
        ("llama", {"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}, "trust_remote_code"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn' rope scaling"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "Gemma 3 only"),
        ("qwen3", {"layer_types": ["sliding_attention", "full_attention"]}, "Gemma 3 only"),
        ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ("gemma3", {"hidden_activation": "gelu"}, "gelu activation"),
        ("llama", {"attention_bias": True}, "biases"),
        ("llama", {"vocab_size": 10**12}, "more than this machine's"),
        ("qwen2", {"hidden_size": -64}, "positive whole number"),
    ],
)
def test_what_is_not_supported_is_refused_in_one_sentence(family_folders, family, change, phrase):
    with pytest.raises(UserInputError, match=phrase) as refusal:
        model_config(changed(family_folders[family], change), "config.json")
    message = str(refusal.value)
    assert "\n" not in message and message.endswith(".")
    # What MiniGPT does not implement names what it does; a damaged or oversized config.json says what is wrong with it.
    assert (SUPPORTED in message) == (phrase not in ("more than this machine's", "positive whole number"))


def test_a_folder_without_safetensors_is_refused(family_folders, tmp_path):
    folder = tmp_path / "pickles"
    folder.mkdir()
    shutil.copyfile(family_folders["llama"] / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserInputError, match="safetensors weights only"):
        load_model(folder)


@pytest.mark.parametrize(("change", "phrase"), [
    ({"mlp_activation": "relu"}, "mlp_activation"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"sliding_window": 8}, "go together"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"family": "mistral"}, "model.family"),
])
def test_family_switches_no_code_reads_are_refused(change, phrase):
    config = RunConfig(model=dataclasses.replace(ModelConfig(vocab_size=300), **change))
    with pytest.raises(UserInputError, match=phrase):
        validate(config)
