"""What the fault tests share: a small model, and checking that an error is one plain sentence."""

import torch

from minigpt.config import ModelConfig
from minigpt.model import GPT


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))


def assert_one_sentence(message: str, *fragments: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def tiny_arguments(corpus_jsonl, tokenizer_file, run_name: str, *extra: str) -> list[str]:
    """`minigpt train` flags for a run of a few seconds: the tiny preset, float32, no evaluation until the end."""
    return ["--config", "tiny", "--dtype", "float32", "--data-files", str(corpus_jsonl), "--tokenizer", str(tokenizer_file),
            "--output-dir", "runs", "--run-name", run_name, "--sample-tokens", "0", "--val-fraction", "0.1",
            "--eval-steps", "1000", "--eval-batches", "1", *extra]
