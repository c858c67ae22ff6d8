"""Hostile and damaged model folders: config.json sizes that would take the machine's memory or
break the model's arithmetic, chat templates reaching for Python's internals, and safetensors
files cut short or with a forged header. Each is refused in one sentence (UserInputError) before
anything large is allocated."""

import json
import shutil
import struct

import pytest
import torch

from helpers import assert_one_sentence
from minigpt.config import ModelConfig, RunConfig
from minigpt.errors import UserInputError
from minigpt.export import export_hf
from minigpt.model import GPT
from minigpt.model_folder import load, save_model_directory
from minigpt.tokenizer import load_folder_tokenizer, load_tokenizer

LARGEST_ALLOCATION = 10_000_000  # elements: the tiny models here hold about 50 thousand


@pytest.fixture(scope="module")
def folders(tokenizer_file, tmp_path_factory):
    """{"hf": a Llama-family Hugging Face folder, "minigpt": a final_model/ without a manifest
    (as older runs wrote it; a manifest would catch an edited file before config.json is read)}."""
    tokenizer = load_tokenizer(tokenizer_file)
    config = RunConfig(model=ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    torch.manual_seed(0)
    model = GPT(config.model).eval()
    root = tmp_path_factory.mktemp("pretrained_faults")
    minigpt = save_model_directory(root / "final_model", model, config, tokenizer)
    (minigpt / "manifest.json").unlink()
    return {"hf": export_hf(model, tokenizer, root / "hf"), "minigpt": minigpt}


@pytest.fixture
def bounded_allocations(monkeypatch):
    """Fails any tensor of more than LARGEST_ALLOCATION elements made off the meta device: what a
    hostile config.json would make the loader allocate before it could refuse it."""
    for name in ("empty", "zeros", "ones", "full", "randn"):
        real = getattr(torch, name)

        def guarded(*args, real=real, name=name, **kwargs):
            shape = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else args
            count = 1
            for size in shape if name != "full" else args[0]:
                count *= int(size)
            device = torch.device(kwargs.get("device") or torch.get_default_device())
            if device.type != "meta" and count > LARGEST_ALLOCATION:
                raise AssertionError(f"torch.{name} of {count} elements: allocated before the configuration was refused")
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, name, guarded)


def copy_with(folder, tmp_path, edit_config):
    copy = shutil.copytree(folder, tmp_path / folder.name)
    config = json.loads((copy / "config.json").read_text())
    edit_config(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


HOSTILE_HF = [
    ({"vocab_size": 10**12}, "more than this machine's"),
    ({"hidden_size": 2**40}, "more than this machine's"),
    ({"num_hidden_layers": 10**7}, "more than this machine's"),
    ({"intermediate_size": 10**11}, "more than this machine's"),
    ({"head_dim": 10**9}, "more than this machine's"),
    ({"vocab_size": -1}, "vocab_size = -1"),
    ({"hidden_size": 32.5}, "hidden_size = 32.5"),
    ({"num_attention_heads": "2"}, "num_attention_heads = '2'"),
    ({"num_attention_heads": 3}, "cannot split"),
    ({"num_key_value_heads": 3}, "cannot split"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps = 'tiny'"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps = -1e-05"),
    ({"rope_theta": [1]}, "rope_theta = [1]"),
    ({"rope_theta": 0}, "rope_theta = 0"),
    ({"rope_scaling": "linear"}, "rope_scaling = 'linear'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "positive numbers"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "positive numbers"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                       "original_max_position_embeddings": 16}}, "above its low_freq_factor"),
    ({"rope_parameters": 5}, "rope_parameters = 5"),
    ({"model_type": ["llama"]}, "model_type = ['llama']"),
    ({"architectures": "LlamaForCausalLM"}, "not a list of names"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings = 'false'"),
    ({"layer_types": 5}, "layer_types = 5"),
]


@pytest.mark.parametrize("changes, words", HOSTILE_HF, ids=[str(changes)[:40] for changes, _ in HOSTILE_HF])
def test_a_hostile_hugging_face_config_is_refused_before_anything_is_allocated(folders, tmp_path, bounded_allocations,
                                                                                changes, words):
    folder = copy_with(folders["hf"], tmp_path, lambda config: config.update(changes))
    with pytest.raises(UserInputError) as error:
        load(folder)
    assert_one_sentence(str(error.value), str(folder / "config.json"), words)


HOSTILE_MINIGPT = [
    ({"n_embd": 2**20, "n_layer": 1000}, "more than this machine's"),
    ({"vocab_size": 10**11}, "more than this machine's"),
    ({"ffn_hidden": 10**12}, "more than this machine's"),
    ({"n_layer": 10**8}, "more than this machine's"),
    ({"n_head": 0}, "model.n_head must be positive"),
    ({"n_embd": -32}, "model.n_embd must be positive"),
    ({"n_head": 3}, "must divide model.n_embd"),
    ({"rope_theta": -1.0}, "model.rope_theta must be positive"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "positive numbers"),
]


@pytest.mark.parametrize("changes, words", HOSTILE_MINIGPT, ids=[str(changes)[:40] for changes, _ in HOSTILE_MINIGPT])
def test_a_hostile_minigpt_config_is_refused_before_anything_is_allocated(folders, tmp_path, bounded_allocations, changes, words):
    folder = copy_with(folders["minigpt"], tmp_path, lambda config: config["model"].update(changes))
    with pytest.raises(UserInputError) as error:
        load(folder)
    assert_one_sentence(str(error.value), str(folder / "config.json"), words)


@pytest.mark.parametrize("template, words", [
    ("{{ ''.__class__.__mro__ }}", "'__class__' of 'str' object is unsafe"),
    ("{{ cycler.__init__.__globals__.os.system('echo pwned') }}", "'__init__' of 'type' object is unsafe"),
    ("{{ joiner.__init__.__globals__ }}", "is unsafe"),
    ("{{ ''.__class__ }}", "'__class__' of 'str' object is unsafe"),  # Jinja alone prints nothing here
    ("{{ lipsum.__globals__ }}", "'__globals__' of 'function' object is unsafe"),
    ("{{ raise_exception.__globals__['__builtins__'] }}", "'__globals__' of 'function' object is unsafe"),
    ("{{ '{0.__class__}'.format(1) }}", "'__class__' of 'int' object is unsafe"),
    ("{{ messages.append({'role': 'user', 'content': 'x'}) }}", "'append' of 'list' object is unsafe"),
    ("{{ ('a' * 5 * 10**8) | length }}", "more than 1000000 items"),  # 500 MB before a limit
    ("{{ (2 ** 100000000) % 7 }}", "a power of 100000000"),
    ("{{ ('a' | center(10**10)) | length }}", "a width or count of 10000000000"),
    ("{{ ('a\\nb' | indent(10**9)) | length }}", "a width or count of 1000000000"),
    ("{{ ('a'.ljust(10**10)) | length }}", "a width or count of 10000000000"),
    ("{{ ('%10000000000s' % 'a') | length }}", "a format with a width past 1000000"),
    ("{{ ('%10000000000s' | format('a')) | length }}", "a format with a width past 1000000"),
    ("{{ ('{:>10000000000}'.format('a')) | length }}", "a format with a width past 1000000"),
])
def test_a_chat_template_reaching_for_python_internals_is_stopped_by_the_sandbox(tokenizer_folders, tmp_path, template, words):
    folder = shutil.copytree(tokenizer_folders["qwen2"], tmp_path / "qwen2")
    (folder / "chat_template.jinja").write_text(template)
    with pytest.raises(UserInputError) as error:
        load_folder_tokenizer(folder).chat_prompt([{"role": "user", "content": "hi"}])
    assert_one_sentence(str(error.value), "sandbox forbids", words)


def header_of(data: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length]), data[8 + length:]


def with_header(header: dict, rest: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + rest


def forged(change):
    """Damage: the first tensor's header entry changed by `change`."""
    def damage(data: bytes) -> bytes:
        header, rest = header_of(data)
        change(header[next(name for name in header if name != "__metadata__")])
        return with_header(header, rest)
    return damage


DAMAGE = {
    "empty": lambda data: b"",
    "cut to 4 bytes": lambda data: data[:4],
    "cut in half": lambda data: data[: len(data) // 2],
    "last byte missing": lambda data: data[:-1],
    "header length 2^63": lambda data: struct.pack("<Q", 2**63) + data[8:],
    "header not JSON": lambda data: data[:8] + b"{" * struct.unpack("<Q", data[:8])[0] + data[8 + struct.unpack("<Q", data[:8])[0]:],
    "offsets past the end": forged(lambda entry: entry.update(data_offsets=[0, 10**12])),
    "a terabyte shape": forged(lambda entry: entry.update(shape=[10**6, 10**6])),
    "unknown dtype": forged(lambda entry: entry.update(dtype="Q7")),
}


@pytest.mark.parametrize("kind", ["hf", "minigpt"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_safetensors_file_is_refused_in_one_sentence(folders, tmp_path, bounded_allocations, kind, damage):
    folder = shutil.copytree(folders[kind], tmp_path / kind)
    weights = folder / "model.safetensors"
    weights.write_bytes(DAMAGE[damage](weights.read_bytes()))
    with pytest.raises(UserInputError) as error:
        load(folder)
    assert_one_sentence(str(error.value), str(folder))
