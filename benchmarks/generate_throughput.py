"""Generation speed with and without the KV cache.

    python benchmarks/generate_throughput.py [--preset small] [--json out.json]

Without a cache every new token runs the whole context through the model again, so the cost
per token grows with the length; with the cache each step processes one token. Both runs use
the same randomly initialised model, prompt and greedy decoding (so they produce the same
tokens), alternating cache / no cache and quoting the median of the repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt.config import preset_config  # noqa: E402
from minigpt.generation import SamplingConfig, generate  # noqa: E402
from minigpt.model import GPT  # noqa: E402


def tokens_per_second(model: GPT, new_tokens: int, use_kv_cache: bool) -> float:
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0)
    start = time.perf_counter()
    produced = generate(model, [0], sampling, use_kv_cache=use_kv_cache)
    return len(produced) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    arguments = parser.parse_args()

    config = preset_config(arguments.preset).model
    config = dataclasses.replace(config, vocab_size=arguments.vocab_size, block_size=max(config.block_size, max(arguments.lengths) + 1))
    torch.manual_seed(0)
    model = GPT(config).eval()
    print(f"preset {arguments.preset}: {model.num_parameters() / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    print(f"{'new tokens':>10} | {'no cache tok/s':>14} | {'KV cache tok/s':>14} | {'speed-up':>8}")
    results = []
    for length in arguments.lengths:
        tokens_per_second(model, min(length, 16), True)  # warm up the kernels
        without, with_cache = [], []
        for _ in range(arguments.repeats):  # alternate, so machine noise hits both alike
            without.append(tokens_per_second(model, length, False))
            with_cache.append(tokens_per_second(model, length, True))
        row = {"new_tokens": length, "no_cache_tokens_per_second": statistics.median(without),
               "kv_cache_tokens_per_second": statistics.median(with_cache)}
        row["speedup"] = row["kv_cache_tokens_per_second"] / row["no_cache_tokens_per_second"]
        results.append(row)
        print(f"{length:>10} | {row['no_cache_tokens_per_second']:>14,.1f} | {row['kv_cache_tokens_per_second']:>14,.1f} | {row['speedup']:>7.2f}x")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({"preset": arguments.preset, "results": results}, indent=2))


if __name__ == "__main__":
    main()
