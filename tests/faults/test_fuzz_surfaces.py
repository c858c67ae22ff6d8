"""Fuzzed input (hypothesis) on what the last wave added: preference records (DPO), classification
records, and a model folder's config.json, tokenizer.json, tokenizer_config.json and
generation_config.json. Whatever JSON they hold, reading them either succeeds or is refused in
one sentence (UserInputError): never another exception."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt.config import ModelConfig, RunConfig
from minigpt.errors import UserInputError
from minigpt.export import export_hf
from minigpt.labelled_data import build_label_maps, encode_records, find_tasks, read_labelled_records
from minigpt.model import GPT
from minigpt.model_folder import load
from minigpt.preference_data import encode_pairs, read_preference_pairs
from minigpt.tokenizer import load_folder_tokenizer, load_tokenizer

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-3, 70) | st.sampled_from([0, -1, 10**12, 2**63, 1.5, float("nan"), float("inf")]) \
    | st.floats(allow_nan=False, width=32) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=8)
texts = st.text(max_size=40)
turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "robot"]), "content": texts | json_values}),
                 max_size=3)


def one_sentence(error: UserInputError) -> None:
    message = str(error).strip()
    assert message and "\n" not in message and "Traceback" not in message, message


def jsonl(tmp_path_factory, records: list) -> str:
    path = tmp_path_factory.mktemp("fuzz") / "records.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    return load_tokenizer(tokenizer_file)


preference_records = st.one_of(
    json_values,
    st.fixed_dictionaries({"prompt": texts | json_values, "chosen": texts | json_values, "rejected": texts | json_values}),
    st.fixed_dictionaries({"chosen": turns | json_values, "rejected": turns | json_values}),
)


@FUZZ
@given(records=st.lists(preference_records, max_size=6))
def test_preference_records_load_or_are_refused_in_one_sentence(tmp_path_factory, tokenizer, records):
    try:
        encode_pairs(read_preference_pairs([jsonl(tmp_path_factory, records)]), tokenizer, 64)
    except UserInputError as error:
        one_sentence(error)


labelled_records = st.one_of(
    json_values,
    st.fixed_dictionaries({"text": texts | json_values, "label": json_values}),
    st.fixed_dictionaries({"text": texts, "label_topic": scalars, "label_tone": scalars}),
)


@FUZZ
@given(records=st.lists(labelled_records, max_size=8))
def test_classification_records_load_or_are_refused_in_one_sentence(tmp_path_factory, tokenizer, records):
    try:
        labelled = read_labelled_records([jsonl(tmp_path_factory, records)])
        maps = build_label_maps(labelled, find_tasks(labelled))
        encode_records(labelled, tokenizer, maps, 64)
    except UserInputError as error:
        one_sentence(error)


@pytest.fixture(scope="module")
def hf_folder(tokenizer, tmp_path_factory):
    model = GPT(RunConfig(model=ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)).model)
    return export_hf(model.eval(), tokenizer, tmp_path_factory.mktemp("fuzz_folder") / "hf")


HF_KEYS = ["model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
           "rope_scaling", "rope_parameters", "tie_word_embeddings", "hidden_act", "layer_types", "sliding_window",
           "use_sliding_window", "auto_map", "num_experts", "query_pre_attn_scalar"]
rope_settings = st.fixed_dictionaries({}, optional={"rope_type": st.sampled_from(["default", "linear", "llama3", "yarn"]) | scalars,
                                                    "factor": scalars, "low_freq_factor": scalars, "high_freq_factor": scalars,
                                                    "original_max_position_embeddings": scalars, "rope_theta": scalars})
config_changes = st.dictionaries(st.sampled_from(HF_KEYS), json_values | rope_settings | st.sampled_from(["gemma3_text", "qwen3"]),
                                 max_size=4)


def fuzzed_folder(hf_folder, tmp_path_factory, name: str, content: bytes):
    folder = shutil.copytree(hf_folder, tmp_path_factory.mktemp("fuzz") / "folder")
    (folder / name).write_bytes(content)
    return folder


@FUZZ
@given(changes=config_changes, whole=st.none() | json_values)
def test_a_model_folders_config_json_loads_or_is_refused_in_one_sentence(tmp_path_factory, hf_folder, changes, whole):
    config = json.loads((hf_folder / "config.json").read_text())
    content = json.dumps({**config, **changes} if whole is None else whole).encode()
    try:
        load(fuzzed_folder(hf_folder, tmp_path_factory, "config.json", content))
    except UserInputError as error:
        one_sentence(error)


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
tokenizer_changes = st.dictionaries(st.sampled_from(["model", "added_tokens", "decoder", "pre_tokenizer", "normalizer",
                                                     "post_processor", "eos_token", "bos_token", "pad_token", "chat_template",
                                                     "eos_token_id", "do_sample", "temperature", "top_k"]),
                                    json_values, max_size=3)


@FUZZ
@given(name=st.sampled_from(TOKENIZER_FILES), changes=tokenizer_changes, whole=st.none() | json_values | st.binary(max_size=40))
def test_a_model_folders_tokenizer_files_load_or_are_refused_in_one_sentence(tmp_path_factory, tokenizer_folders, name, changes, whole):
    """A pretrained (Qwen2-like) folder's tokenizer.json, tokenizer_config.json or
    generation_config.json with parts replaced, or holding anything else: loading, then
    encoding, decoding and a chat prompt."""
    base = json.loads((tokenizer_folders["qwen2"] / name).read_text())
    content = whole if isinstance(whole, bytes) else json.dumps({**base, **changes} if whole is None else whole).encode()
    folder = fuzzed_folder(tokenizer_folders["qwen2"], tmp_path_factory, name, content)
    try:
        loaded = load_folder_tokenizer(folder)
        loaded.decode(loaded.encode("hello world"))
        loaded.chat_prompt([{"role": "user", "content": "hi"}])
    except UserInputError as error:
        one_sentence(error)
