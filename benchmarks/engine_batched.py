"""Batched decoding: eight sequences decoded together by the engine vs one after another.

    python benchmarks/engine_batched.py [--presets small medium] [--rows 8] [--prompt-tokens 64]
                                        [--new-tokens 128] [--dtypes float32 bfloat16] [--threads N] [--json out.json]

A decoding step on one sequence multiplies a single row of activations by every weight matrix:
the time goes into reading the weights, not into arithmetic. Eight rows in one step read the
weights once for all eight, so the batch should produce several times more tokens per second.
Each run decodes --rows random prompts of --prompt-tokens tokens, greedily (no stop ids, so
every row makes exactly --new-tokens tokens), with a randomly initialised model of the preset's
shape: once as one batch on one Engine, once as --rows single-row runs one after another. The
two are alternated --repeats times and the median of each is quoted; both produce the same
tokens (checked). bfloat16 runs under CPU autocast (weights stay float32), as training does, and
only where torch reports AVX512-BF16 or AMX on this CPU.

On a machine shared with other busy processes, PyTorch's threads wait for each other a lot on
these small per-step operations, and the figures swing widely; --threads 1 steadies them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt.config import preset_config  # noqa: E402
from minigpt.engine import Engine, Request, SamplingConfig  # noqa: E402
from minigpt.model import GPT  # noqa: E402


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo (Linux) or the platform module gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_has_bfloat16_instructions() -> bool:
    """AVX512-BF16 or AMX, as torch sees them (private helpers: absent in some builds, hence getattr)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def decode(model: GPT, requests: list[Request], together: bool, dtype: torch.dtype) -> tuple[float, list[list[int]]]:
    """Seconds to decode `requests` (as one batch, or one after another), and each one's tokens."""
    produced: list[list[int]] = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        start = time.perf_counter()
        for batch in ([requests] if together else [[request] for request in requests]):
            tokens: dict[int, list[int]] = {}
            for event in Engine(model).generate(batch):
                tokens.setdefault(event.row, []).append(event.token)
            produced += [tokens[row] for row in sorted(tokens)]
        seconds = time.perf_counter() - start
    return seconds, produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small"])
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", help="also write the figures to this file")
    arguments = parser.parse_args()

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    dtypes = [name for name in arguments.dtypes if name == "float32" or cpu_has_bfloat16_instructions()]
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + ("" if dtypes == arguments.dtypes else " (no AVX512-BF16/AMX: bfloat16 skipped)"))
    print(f"{arguments.rows} rows x ({arguments.prompt_tokens} prompt + {arguments.new_tokens} new tokens), greedy; "
          f"median of {arguments.repeats}, batched and sequential alternated")
    print(f"{'preset':>8} | {'dtype':>8} | {'sequential tok/s':>16} | {'batched tok/s':>13} | {'ratio':>6}")
    results = []
    for preset in arguments.presets:
        config = preset_config(preset).model
        block_size = max(config.block_size, arguments.prompt_tokens + arguments.new_tokens)
        config = dataclasses.replace(config, vocab_size=arguments.vocab_size, block_size=block_size)
        torch.manual_seed(0)
        model = GPT(config).eval()
        generator = torch.Generator().manual_seed(1)
        sampling = SamplingConfig(max_new_tokens=arguments.new_tokens, temperature=0)
        requests = [Request(torch.randint(4, config.vocab_size, (arguments.prompt_tokens,), generator=generator).tolist(), sampling)
                    for _ in range(arguments.rows)]
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            decode(model, requests[:2], True, dtype)  # warm up the kernels
            sequential, batched = [], []
            for _ in range(arguments.repeats):  # alternate, so machine noise hits both alike
                seconds, one_by_one = decode(model, requests, False, dtype)
                sequential.append(arguments.rows * arguments.new_tokens / seconds)
                seconds, together = decode(model, requests, True, dtype)
                batched.append(arguments.rows * arguments.new_tokens / seconds)
            row = {"preset": preset, "dtype": dtype_name, "parameters": model.num_parameters(),
                   "sequential_tokens_per_second": statistics.median(sequential),
                   "batched_tokens_per_second": statistics.median(batched),
                   "same_tokens": together == one_by_one}
            row["ratio"] = row["batched_tokens_per_second"] / row["sequential_tokens_per_second"]
            results.append(row)
            print(f"{preset:>8} | {dtype_name:>8} | {row['sequential_tokens_per_second']:>16,.1f} | "
                  f"{row['batched_tokens_per_second']:>13,.1f} | {row['ratio']:>5.2f}x"
                  + ("" if row["same_tokens"] else "  (tokens differ: rounding between batch shapes)"))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({"cpu": cpu_model(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
