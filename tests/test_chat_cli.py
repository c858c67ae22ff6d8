"""scripts/chat.py: one-shot replies, history trimming, /reset and /exit, adapters, the untuned warning."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from minigpt.chat import ChatSession
from minigpt.cli import chat
from minigpt.config import ModelConfig, RunConfig
from minigpt.errors import UserInputError
from minigpt.generation import SamplingConfig, generate
from minigpt.model import GPT
from minigpt.model_folder import load, save_model_directory
from minigpt.tokenizer import load_tokenizer

GREEDY = ["--temperature", "0", "--max-new-tokens", "6"]


def run_chat(*arguments: str, input: str) -> subprocess.CompletedProcess:
    """scripts/chat.py as a user runs it, with `input` typed on stdin."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "chat.py"), *arguments], input=input,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def model_directory(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    config = RunConfig(model=ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    torch.manual_seed(0)
    return save_model_directory(tmp_path / "final_model", GPT(config.model).eval(), config, tokenizer)


def test_prompt_prints_only_the_reply_and_warns_about_an_untuned_model(model_directory, capsys):
    assert chat.main([str(model_directory), "--prompt", "Hello there", "--system", "Be brief.", *GREEDY]) == 0
    out, err = capsys.readouterr()
    loaded = load(model_directory)
    model, tokenizer = loaded.model, loaded.tokenizer
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    sampling = SamplingConfig(max_new_tokens=6, temperature=0, stop_ids=(tokenizer.im_end_id, tokenizer.eos_id))
    assert out == tokenizer.decode(generate(model, tokenizer.chat_prompt(turns), sampling)) + "\n"
    assert "never chat-tuned" in err and err.count("warning") == 1


def test_training_stage_is_read_from_config_json(model_directory):
    assert load(model_directory).stage == "pretrain"
    config = json.loads((model_directory / "config.json").read_text())
    config["train"]["stage"] = "sft"
    (model_directory / "config.json").write_text(json.dumps(config))
    (model_directory / "manifest.json").unlink()  # edited by hand: its checksum no longer matches
    assert load(model_directory).stage == "sft"


def test_history_is_trimmed_oldest_first_keeping_the_system_prompt(model_directory, capsys):
    loaded = load(model_directory)
    model, tokenizer = loaded.model, loaded.tokenizer
    session = ChatSession(model, tokenizer, SamplingConfig(max_new_tokens=8, temperature=0), system="Be brief.")
    assert session.prompt_limit == 64 - 8
    for number in range(4):
        session.history += [{"role": "user", "content": f"q{number}"}, {"role": "assistant", "content": f"a{number}"}]
    ids = session.prompt_ids("last")
    assert len(ids) <= session.prompt_limit
    assert session.history[-2:] == [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]
    assert len(session.history) < 8 and session.history[0]["role"] == "user"
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.")
    assert "oldest exchange" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="write a shorter one"):
        session.prompt_ids("word " * 100)


def test_interactive_session_with_reset_and_exit(model_directory):
    result = run_chat(str(model_directory), *GREEDY, input="hello\n/reset\nagain\n/exit\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2 and "(conversation cleared)" in result.stdout
    assert "never chat-tuned" in result.stderr


def test_end_of_input_ends_the_session(model_directory):
    result = run_chat(str(model_directory), *GREEDY, input="hello\n")
    assert result.returncode == 0 and result.stdout.count("assistant> ") == 1


def test_bad_flags_are_one_sentence(model_directory, tmp_path, capsys):
    assert chat.main([str(model_directory), "--top-p", "0", "--prompt", "hi"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err
    assert chat.main([str(tmp_path / "missing"), "--prompt", "hi"]) == 2


def test_replies_are_kept_in_the_history_until_reset(model_directory, capsys):
    loaded = load(model_directory)
    model, tokenizer = loaded.model, loaded.tokenizer
    sampling = SamplingConfig(max_new_tokens=3, temperature=0)
    session = ChatSession(model, tokenizer, sampling)
    answer = session.reply("hi")
    assert capsys.readouterr().out == answer + "\n"
    assert sampling.stop_ids == ()  # the stop tokens go on a copy: the caller's settings are left as they were
    assert session.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
    second_prompt = tokenizer.decode(session.prompt_ids("more"))
    assert second_prompt.count("<|im_start|>user") == 2
    session.reset()
    assert session.history == [] and tokenizer.decode(session.prompt_ids("more")).count("<|im_start|>user") == 1
