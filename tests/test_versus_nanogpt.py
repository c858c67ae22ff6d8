"""benchmarks/versus_nanogpt.py without nanoGPT: the data it writes for nanoGPT, how it reads nanoGPT's log, and the FLOPs it counts for MFU."""

import importlib.util
import pickle
import sys

import numpy as np

from minigpt.config import ModelConfig
from minigpt.model import GPT

from conftest import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location("versus_nanogpt", REPO / "benchmarks" / "versus_nanogpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_the_data_is_what_nanogpts_prepare_script_writes(tmp_path):
    versus = load_benchmark()
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 10
    vocabulary = versus.write_nanogpt_data(text, tmp_path / "shakespeare_char")
    meta = pickle.loads((tmp_path / "shakespeare_char" / "meta.pkl").read_bytes())
    assert vocabulary == meta["vocab_size"] == len(set(text)) and sorted(meta["stoi"]) == list(meta["stoi"])  # ids in character order
    split = int(len(text) * 0.9)
    for name, part in (("train.bin", text[:split]), ("val.bin", text[split:])):
        ids = np.fromfile(tmp_path / "shakespeare_char" / name, dtype=np.uint16)
        assert "".join(meta["itos"][int(index)] for index in ids) == part
    train, val = versus.write_minigpt_data(text, tmp_path)
    assert train.read_text() + val.read_text() == text and val.read_text() == text[split:]


def test_nanogpts_iteration_times_are_read_after_the_warmup():
    log = ("step 0: train loss 4.1743, val loss 4.1756\n"
           "iter 0: loss 4.1800, time 912.40ms, mfu -100.00%\n"
           "iter 1: loss 4.0500, time 25.50ms, mfu -100.00%\n"
           "iter 2: loss nan, time 26.25ms, mfu 1.02%\n")
    assert load_benchmark().nanogpt_iteration_ms(log, warmup=1) == [25.5, 26.25]


def test_flops_per_token_count_each_programs_own_matrices():
    versus = load_benchmark()
    shape = versus.SHAPES["nanogpt-10.7M"]
    attention = 12 * shape.n_layer * shape.block_size * shape.n_embd
    # nanoGPT prints "number of parameters: 10.65M" for this model: these matrices plus 9,600 LayerNorm weights.
    assert (versus.nanogpt_flops_per_token(shape, 65) - attention) / 6 == 10_651_392 - 9_600
    config = ModelConfig(n_layer=6, n_head=6, n_kv_head=6, n_embd=384, block_size=256, vocab_size=65 + 4, dropout=0.0)
    assert versus.minigpt_flops_per_token(shape, 65) == GPT(config).flops_per_token()  # counted on the meta device, the same
