"""Shared fixtures: a small JSONL corpus and a tokenizer trained on it once per test session.

Optional packages. The core must be tested without the optional packages that the export tests
compare against (transformers, peft, gguf): with MINIGPT_HIDE_OPTIONAL=1 this file hides them from
every import, so a bug that only those comparisons would see shows up as a missed bug (CI runs
the core tests once so). A test that needs an optional package asks for it with `require(name)`
(or `optional(name)`, a module whose first use asks): where it is missing the test is skipped,
that test alone; under CI=true, where every optional package is installed, a missing one fails
the test instead, so a broken install cannot pass as a row of skips. A package hidden on purpose
is skipped under CI too.
"""

import contextlib
import importlib
import importlib.abc
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

HIDDEN_PACKAGES = ("transformers", "peft", "gguf") if os.environ.get("MINIGPT_HIDE_OPTIONAL") == "1" else ()


class HideOptionalPackages(importlib.abc.MetaPathFinder):
    """An import finder that answers "not installed" for HIDDEN_PACKAGES and their submodules."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        if name.partition(".")[0] in HIDDEN_PACKAGES:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by MINIGPT_HIDE_OPTIONAL=1)", name=name)
        return None


if HIDDEN_PACKAGES:
    assert not any(name.partition(".")[0] in HIDDEN_PACKAGES for name in sys.modules), "imported before conftest hid it"
    sys.meta_path.insert(0, HideOptionalPackages())


def require(name: str) -> ModuleType:
    """The optional package `name`; the test is skipped where it is missing, and fails under CI=true."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if name.partition(".")[0] in HIDDEN_PACKAGES:
            pytest.skip(f"{name} is hidden (MINIGPT_HIDE_OPTIONAL=1)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed ({error}); CI installs every optional package (pip install -e '.[test]').")
        pytest.skip(f"needs {name} (pip install -e '.[test]')")


class optional:  # noqa: N801 - reads like the module it stands for
    """A module-level stand-in for an optional package: `transformers = optional("transformers")`
    imports nothing until a test uses it, and then `require`s it, so only the tests that use it skip."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attribute: str):  # noqa: ANN204
        if attribute.startswith("_"):  # what pytest's collection asks of every module-level name
            raise AttributeError(attribute)
        return getattr(require(self.name), attribute)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.requires("gguf")`: for tests that need a package only through MiniGPT's code."""
    for marker in item.iter_markers("requires"):
        for name in marker.args:
            require(name)

from minigpt.cli.common import run_subcommand
from minigpt.corpus import builtin_documents
from minigpt.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    """About 300 KB of English documentation as JSONL, one document per line."""
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    size = 0
    with open(path, "w", encoding="utf-8") as file:
        for document in builtin_documents():
            file.write(json.dumps({"text": document}) + "\n")
            size += len(document)
            if size > 300_000:
                break
    return path


@pytest.fixture(scope="session")
def tokenizer_file(corpus_jsonl, tmp_path_factory) -> Path:
    texts = (json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines())
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_bpe_tokenizer(texts, vocab_size=512, show_progress=False).save(path)
    return path


def chat_file(path: Path, count: int = 120) -> Path:
    """`count` short conversations in the `conversations` format, one per line."""
    with open(path, "w", encoding="utf-8") as file:
        for number in range(count):
            turns = [{"role": "user", "content": f"What is {number} times two?"},
                     {"role": "assistant", "content": f"{number} times two is {2 * number}."}]
            file.write(json.dumps({"conversations": turns}) + "\n")
    return path


def run_in_process(command: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """`minigpt COMMAND ARGUMENTS` called in this process, in `cwd`: its exit status and what it
    printed, as `run_script` reports a subprocess's. Seconds faster than a new Python importing
    torch, so every check of a command's flags and messages runs this way; each command keeps one
    real subprocess test (run_script) for its door."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = run_subcommand(command, arguments)
            except SystemExit as exit:  # argparse's --help and usage errors
                status = exit.code if isinstance(exit.code, int) else 0
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["minigpt", command, *arguments], status, out.getvalue(), err.getvalue())


def run_script(script: str, *arguments: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run one of scripts/ as a user would, in `cwd`, capturing its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *arguments],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


# ----------------------------------------------------------------------------- pretrained tokenizer folders
# Tiny Hugging Face tokenizer folders shaped like the four families' (issue #27), trained here on a
# few kilobytes so no test downloads anything: byte-level BPE with the special tokens at the END of
# the vocabulary (Llama 3, Qwen2.5, Qwen3), and SentencePiece-style BPE (spaces as "▁", unknown
# bytes as <0xNN> tokens) with the special tokens at the START (Gemma 3). The chat templates copy
# the real ones' features (see tests/chat_templates/); tools and images are left out.

TEMPLATES = REPO / "tests" / "chat_templates"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZER_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. A second sentence, with numbers 12345 and 67.",
    "机器学习是人工智能的一个分支。你好，世界！今天天气很好。",
    "Hello! How can I help you today? I am a helpful assistant and I like to think step by step.",
    "    indented code:\n\tdef f(x):\n\t\treturn x * 2\n\n\n",
    "Emoji 🎉🚀 and accents é ä ñ, punctuation ... !!! ???",
]
# family: (split regex or None for SentencePiece-style, special tokens, tokenizer_config, generation_config)
FAMILIES = {
    "llama3": (LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                "clean_up_tokenization_spaces": True, "model_max_length": 131072},
               {"bos_token_id": "<|begin_of_text|>", "eos_token_id": ["<|end_of_text|>", "<|eot_id|>"],
                "do_sample": True, "temperature": 0.6, "top_p": 0.9}),
    "qwen2": (QWEN_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "add_prefix_space": False, "errors": "replace", "split_special_tokens": False, "clean_up_tokenization_spaces": False},
              {"bos_token_id": "<|endoftext|>", "eos_token_id": ["<|im_end|>", "<|endoftext|>"], "pad_token_id": "<|endoftext|>",
               "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}),
    "qwen3": (QWEN_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "add_prefix_space": False, "errors": "replace", "split_special_tokens": False, "clean_up_tokenization_spaces": False},
              {"bos_token_id": "<|endoftext|>", "eos_token_id": ["<|im_end|>", "<|endoftext|>"], "pad_token_id": "<|endoftext|>",
               "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}),
    "gemma3": (None, ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
               {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False,
                "spaces_between_special_tokens": False, "clean_up_tokenization_spaces": False},
               {"bos_token_id": "<bos>", "eos_token_id": ["<eos>", "<end_of_turn>"], "pad_token_id": "<pad>",
                "do_sample": True, "top_k": 64, "top_p": 0.95}),
}


def build_tokenizer_folder(family: str, folder: Path) -> Path:
    """A Hugging Face folder with the tokenizer files of `family` (a key of FAMILIES): tokenizer.json,
    tokenizer_config.json, chat_template.jinja and generation_config.json (its ids by token name
    above, written as numbers)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    split, specials, tokenizer_config, generation_config = FAMILIES[family]
    if split is not None:  # byte-level BPE: 256 byte tokens, merges, then the special tokens
        backend = Tokenizer(models.BPE())
        backend.normalizer = normalizers.NFC() if family.startswith("qwen") else None
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(TOKENIZER_TRAINING_TEXT * 5, trainer=trainer)
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
        if family == "qwen3":  # Qwen3's reasoning tags are added tokens that are not special
            backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in ("<think>", "</think>")])
    else:  # SentencePiece-style: spaces become "▁", no prefix space, unknown bytes fall back to <0xNN>
        backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials + byte_tokens, show_progress=False)
        backend.train_from_iterator(TOKENIZER_TRAINING_TEXT * 5, trainer=trainer)
        # The trainer lists the byte tokens as added tokens; in a real folder they are only vocabulary.
        description = json.loads(backend.to_str())
        description["added_tokens"] = [token for token in description["added_tokens"] if token["content"] not in byte_tokens]
        backend = Tokenizer.from_str(json.dumps(description))
    bos = tokenizer_config.get("bos_token")
    if bos and (split is None or family == "llama3"):  # Llama 3 and Gemma put BOS before every text
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    elif split is not None:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "chat_template.jinja").write_text((TEMPLATES / f"{family}.jinja").read_text())
    ids = {key: [backend.token_to_id(token) for token in value] if isinstance(value, list) else value if not isinstance(value, str)
           else backend.token_to_id(value) for key, value in generation_config.items()}
    (folder / "generation_config.json").write_text(json.dumps(ids, indent=2))
    return folder


@pytest.fixture(scope="session")
def tokenizer_folders(tmp_path_factory) -> dict[str, Path]:
    """{family: a tokenizer folder} for llama3, qwen2, qwen3 and gemma3 (see build_tokenizer_folder)."""
    root = tmp_path_factory.mktemp("tokenizer_folders")
    return {family: build_tokenizer_folder(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def memorising_model(tokenizer_file, tmp_path_factory) -> Path:
    """A chat model that answers tests/serving.py's REPLIES word for word (trained once per session)."""
    import torch

    from minigpt.tokenizer import load_tokenizer
    from serving import memorising_chat_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine one thread trains this tiny model many times faster
    try:
        return memorising_chat_model(tmp_path_factory.mktemp("serve") / "final_model", load_tokenizer(tokenizer_file))
    finally:
        torch.set_num_threads(threads)


# Tiny random models of each pretrained family (minigpt/families.py), as transformers builds and
# saves them. Each is small but turns on what its family changes: Llama 3's llama3 rope scaling
# and an untied head, Qwen2's q/k/v biases, Qwen3's q/k norms with head_dim != width / heads,
# Gemma 3's (1 + w) norms, sandwich norms, GeLU gate, a 4-token sliding window on local layers
# and linear rope scaling on its global layer. Norm gains and biases are randomised too (they
# start at 1 or 0, where a missing (1 + w) or bias would go unnoticed).
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    )),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, max_position_embeddings=128, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(
        num_key_value_heads=1, num_hidden_layers=3, head_dim=32, max_position_embeddings=128, query_pre_attn_scalar=24,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )),
}


# The tokenizer each model family's fixture folder carries (a key of FAMILIES above).
FAMILY_TOKENIZERS = {"llama": "llama3", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    """{family: a Hugging Face folder holding a tiny random model of it (float32 safetensors,
    config.json as transformers writes it) with its family's own tokenizer, chat template and
    generation_config.json (build_tokenizer_folder): the vocabulary size and the bos/eos/pad ids
    of config.json are that tokenizer's."""
    import torch
    import transformers

    from minigpt.tokenizer import load_folder_tokenizer

    folders = {}
    for family, (config_class, settings) in FAMILY_CONFIGS.items():
        folder = tmp_path_factory.mktemp(family)
        tokenizer = load_folder_tokenizer(build_tokenizer_folder(FAMILY_TOKENIZERS[family], folder))
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(**{
            "vocab_size": tokenizer.vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "rms_norm_eps": 1e-6, "bos_token_id": tokenizer.bos_ids[0] if tokenizer.bos_ids else None,
            "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, **settings,
        })
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.dim() == 1:
                    parameter.add_(torch.randn_like(parameter) * 0.2)
        model.save_pretrained(folder)
        build_tokenizer_folder(FAMILY_TOKENIZERS[family], folder)  # again: save_pretrained wrote its own generation_config.json
        folders[family] = folder
    return folders
