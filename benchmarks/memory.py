"""Gradient checkpointing: peak memory and step time with and without, for `small` and `medium`.

Each measurement runs in a fresh process (its peak resident memory is its own), the two settings
alternating so that a shared machine's changing load falls on both alike. Each process builds
the model, takes one warm-up step, then times `--steps` steps of forward, backward and AdamW;
the peak is the rise of VmHWM (Linux) over the process's size before the model was built.

    python benchmarks/memory.py                      # small at batch 16, medium at batch 8
    python benchmarks/memory.py --repeats 3 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from minigpt.config import apply_overrides, preset_config
from minigpt.memory import PeakMemory, estimate_memory, gb
from minigpt.model import GPT
from minigpt.optim import build_optimizer
from minigpt.runtime import configure_threads, keep_freed_memory_for_reuse

SHAPES = {"small": 16, "medium": 8}  # batch sizes at which activations dominate the memory
VOCABULARY = 6400


def measure(preset: str, batch: int, checkpointing: bool, steps: int) -> dict[str, float]:
    """One process's measurement: peak memory rise and mean step seconds."""
    config = apply_overrides(preset_config(preset), {"model.vocab_size": VOCABULARY})
    configure_threads()
    keep_freed_memory_for_reuse()
    tokens = torch.randint(0, VOCABULARY, (batch, config.model.block_size + 1))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    peak = PeakMemory(torch.device("cpu"))
    baseline = peak.read_and_reset()["peak_rss_bytes"]
    model = GPT(config.model)
    model.gradient_checkpointing = checkpointing
    optimizer = build_optimizer(model, config.train, "cpu")
    times = []
    for _ in range(steps + 1):  # the first warms up
        start = time.perf_counter()
        loss = model(inputs, targets)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    estimate = estimate_memory(model, config.model, batch, torch.float32).peak(checkpointing)
    return {"peak_bytes": peak.read_and_reset()["peak_rss_bytes"] - baseline, "step_seconds": statistics.mean(times[1:]),
            "estimate_bytes": estimate}


def run_child(preset: str, batch: int, checkpointing: bool, steps: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", preset, str(batch), str(int(checkpointing)), "--steps", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="alternating pairs of processes per shape")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up)")
    parser.add_argument("--presets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--child", nargs=3, metavar=("PRESET", "BATCH", "CHECKPOINTING"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        preset, batch, checkpointing = arguments.child
        print(json.dumps(measure(preset, int(batch), checkpointing == "1", arguments.steps)))
        return
    print(f"{'shape':<8} {'batch':>5} {'checkpointing':>13} {'peak':>10} {'estimate':>10} {'step s':>8}")
    for preset in arguments.presets:
        batch = SHAPES[preset]
        results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(arguments.repeats):
            for checkpointing in (False, True):
                result = run_child(preset, batch, checkpointing, arguments.steps)
                results[checkpointing].append(result)
                print(f"{preset:<8} {batch:>5} {'on' if checkpointing else 'off':>13} {gb(result['peak_bytes']):>10} "
                      f"{gb(result['estimate_bytes']):>10} {result['step_seconds']:>8.2f}", flush=True)
        peak = {setting: statistics.median(r["peak_bytes"] for r in rows) for setting, rows in results.items()}
        seconds = {setting: statistics.median(r["step_seconds"] for r in rows) for setting, rows in results.items()}
        print(f"{preset}: with checkpointing, peak memory x{peak[True] / peak[False]:.2f}, step time x{seconds[True] / seconds[False]:.2f}")


if __name__ == "__main__":
    main()
