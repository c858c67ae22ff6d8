"""Training throughput: tokens/s, ms/step, model FLOPs utilisation and memory, eager and compiled.

    python benchmarks/train_throughput.py [--shapes baby nanogpt-10.7M tiny small medium] [--modes eager compiled]

Each shape trains on random tokens (the data pipeline has its own benchmark) through the
trainer's own optimizer step (`Trainer.optimizer_step`: forward, backward, clipping, the NaN
guard, AdamW) on the CPU, in each of --dtypes (bfloat16 = autocast, weights stay float32). The figures:
    ms/step      median time of one optimizer step over the timed steps
    tokens/s     batch_size * block_size / (ms/step)
    MFU          model FLOPs (6 per weight per token, plus attention) per second, divided by the
                 matrix-multiply peak of the same dtype, measured by this script on this machine
    RSS          the process's resident memory after the shape's steps
"baby" and "nanogpt-10.7M" are the two reference shapes of nanoGPT's README (character
vocabulary of 65), for comparison with nanoGPT run on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt.config import ModelConfig, RunConfig, TrainConfig, preset_config  # noqa: E402
from minigpt.model import GPT  # noqa: E402
from minigpt.objective import LanguageModelObjective  # noqa: E402
from minigpt.runtime import (  # noqa: E402
    DTYPES, compile_model, configure_threads, cpu_has_fast_bfloat16, keep_freed_memory_for_reuse, measure_matmul_peak,
)
from minigpt.tokenizer import train_char_tokenizer  # noqa: E402
from minigpt.trainer import Trainer  # noqa: E402

REFERENCE_SHAPES = {
    # name: (model, batch size)
    "baby": (ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), 12),
    "nanogpt-10.7M": (ModelConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 16),
}


def shape(name: str) -> tuple[ModelConfig, int]:
    if name in REFERENCE_SHAPES:
        return REFERENCE_SHAPES[name]
    preset = preset_config(name)
    return dataclasses.replace(preset.model, vocab_size=preset.train.tokenizer_vocab_size), preset.train.batch_size


def measure(config: ModelConfig, batch_size: int, compiled: bool, dtype: torch.dtype, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = GPT(config)
    # A character tokenizer of exactly the shape's vocabulary: the batches are random ids anyway.
    tokenizer = train_char_tokenizer(["".join(chr(0x4E00 + index) for index in range(config.vocab_size - 5))], show_progress=False)
    objective = LanguageModelObjective(tokenizer)
    run = RunConfig(model=config, train=TrainConfig(batch_size=batch_size, disable_monitoring=True))
    trainer = Trainer(run, model, tokenizer, objective, None, None, tempfile.mkdtemp(), torch.device("cpu"), dtype, show_progress=False)
    batch = objective.example_batch(batch_size, config.block_size)
    compile_start = time.perf_counter()
    runner = compile_model(model, trainer.example_loss) if compiled else model
    compile_seconds = time.perf_counter() - compile_start if compiled else 0.0
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss, _, _, _ = trainer.optimizer_step(runner, [batch], timed=False)
        loss.item()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_second = batch_size * config.block_size / seconds
    return {
        "parameters": model.num_parameters(), "ms_per_step": 1000 * seconds, "tokens_per_second": tokens_per_second,
        "flops_per_token": model.flops_per_token(), "compile_seconds": compile_seconds,
        "rss_megabytes": psutil.Process().memory_info().rss / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["baby", "nanogpt-10.7M", "tiny", "small", "medium"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"],
                        help="default: float32, plus bfloat16 where this CPU multiplies it fast (elsewhere it is emulated, and very slow)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per shape and mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    arguments = parser.parse_args()

    threads = configure_threads(arguments.num_threads)
    keep_freed_memory_for_reuse()  # as scripts/train.py does
    arguments.dtypes = arguments.dtypes or ["float32"] + (["bfloat16"] if cpu_has_fast_bfloat16() else [])
    peaks = {name: measure_matmul_peak(torch.device("cpu"), DTYPES[name], seconds=1.0) for name in arguments.dtypes}
    print(f"{threads} threads; matmul peak measured here: " + ", ".join(f"{name} {peak / 1e9:.0f} GFLOP/s" for name, peak in peaks.items()))
    print(f"{'shape':<14} {'mode':<18} {'params':>8} | {'ms/step':>9} | {'tokens/s':>9} | {'MFU':>6} | {'compile s':>9} | {'RSS MB':>7}")
    results = []
    for name in arguments.shapes:
        config, batch_size = shape(name)
        for dtype in arguments.dtypes:
            for mode in arguments.modes:
                figures = measure(config, batch_size, mode == "compiled", DTYPES[dtype], arguments.steps, arguments.warmup)
                figures.update(shape=name, mode=mode, dtype=dtype, batch_size=batch_size, block_size=config.block_size,
                               mfu=figures["flops_per_token"] * figures["tokens_per_second"] / peaks[dtype])
                results.append(figures)
                label = f"{mode} {dtype}"
                print(f"{name:<14} {label:<18} {figures['parameters'] / 1e6:>7.2f}M | {figures['ms_per_step']:>9.1f} | "
                      f"{figures['tokens_per_second']:>9,.0f} | {figures['mfu']:>6.1%} | {figures['compile_seconds']:>9.1f} | "
                      f"{figures['rss_megabytes']:>7,.0f}", flush=True)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({"peak_flops": peaks, "threads": threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
