"""Shared fixtures: a small JSONL corpus and a tokenizer trained on it once per test session."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def family_folders(tokenizer_file, tmp_path_factory) -> dict[str, Path]:
    """{family: a Hugging Face folder holding a tiny random model of it (float32 safetensors,
    config.json as transformers writes it) and the session's MiniGPT tokenizer.json}.

    The tokenizer is MiniGPT's byte-level BPE with its specials at ids 0-3, which MiniGPT's loader
    reads today; the families' own tokenizers (specials at the end, Metaspace for Gemma) and chat
    templates come with the chat-templates work on issue #27, which extends this fixture.
    """
    import shutil

    import torch
    import transformers

    from minigpt.tokenizer import load_tokenizer

    vocab_size = load_tokenizer(tokenizer_file).vocab_size
    folders = {}
    for family, (config_class, settings) in FAMILY_CONFIGS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(**{
            "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 3, **settings,
        })
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.dim() == 1:
                    parameter.add_(torch.randn_like(parameter) * 0.2)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
        folders[family] = folder
    return folders
