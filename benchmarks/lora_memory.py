"""Memory and step time of full fine-tuning versus LoRA, on the `small` preset.

    python benchmarks/lora_memory.py [--rank 8] [--steps 3] [--rounds 2] [--batch-size 16]

Each measurement runs in its own fresh process, so that one's freed memory cannot hide the
other's peak; the two kinds alternate (full, lora, full, lora, ...) because timings on a shared
machine drift. A process builds the model (float32, eager), then takes a warm-up step and
--steps timed steps of plain torch AdamW over its trainable parameters on random tokens:
    full   every parameter trains: gradients and AdamW's two moments for all of them
    lora   apply_lora(rank R) on q, k, v, o, gate, up, down: gradients and moments for the
           adapters only (the activations kept for the backward pass are the same in both)
The workers run with MALLOC_MMAP_THRESHOLD_=65536: glibc then gives every tensor larger than
64 KB its own mapping and returns it to the system when freed, so the peak RSS is the peak of
live memory. With glibc's default (a threshold that grows to 32 MB) freed activations stay in
the heap and the peak depends on fragmentation: LoRA's many small rank-R tensors then made its
peak RSS look *higher* than full fine-tuning's, although it holds less.
Reported per kind (the median over rounds):
    peak RSS     the process's peak resident memory (resource.getrusage ru_maxrss)
    over model   the peak minus the resident memory once the model was built: what training adds
    ms/step      the median step time
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt.config import preset_config  # noqa: E402
from minigpt.lora import LoRAConfig, apply_lora, count_trainable, format_trainable, lora_parameters  # noqa: E402
from minigpt.model import GPT  # noqa: E402

KINDS = ("full", "lora")
WORKER_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # RSS = live memory (see the docstring)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes


def measure(kind: str, rank: int, steps: int, batch_size: int) -> dict:
    """One process's measurement (the --worker side)."""
    preset = preset_config("small")
    config = dataclasses.replace(preset.model, vocab_size=preset.train.tokenizer_vocab_size)
    torch.manual_seed(0)
    model = GPT(config).train()
    if kind == "lora":
        apply_lora(model, LoRAConfig(rank=rank))
        parameters = lora_parameters(model)
    else:
        parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    model_rss = peak_rss_mb()
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1))
    times = []
    for _ in range(steps + 1):  # the first step allocates gradients and AdamW's state: not timed
        start = time.perf_counter()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    trainable, total = count_trainable(model)
    return {"kind": kind, "peak_rss_mb": peak_rss_mb(), "model_rss_mb": model_rss,
            "ms_per_step": 1000 * statistics.median(times[1:]), "trainable": format_trainable(trainable, total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        print(json.dumps(measure(arguments.worker, arguments.rank, arguments.steps, arguments.batch_size)))
        return
    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for _ in range(arguments.rounds):
        for kind in KINDS:
            command = [sys.executable, __file__, "--worker", kind, "--rank", str(arguments.rank),
                       "--steps", str(arguments.steps), "--batch-size", str(arguments.batch_size)]
            environment = {**os.environ, **WORKER_ENVIRONMENT}
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
            results[kind].append(json.loads(output.splitlines()[-1]))
    summary = {}
    print(f"small preset, batch {arguments.batch_size}, float32 eager, {arguments.rounds} rounds of {arguments.steps} timed steps")
    for kind in KINDS:
        runs = results[kind]
        peak = statistics.median(run["peak_rss_mb"] for run in runs)
        added = statistics.median(run["peak_rss_mb"] - run["model_rss_mb"] for run in runs)
        step = statistics.median(run["ms_per_step"] for run in runs)
        summary[kind] = (peak, added, step)
        label = kind if kind == "full" else f"lora r={arguments.rank}"
        print(f"{label:>10}: peak RSS {peak:7.0f} MB   over model {added:6.0f} MB   {step:7.0f} ms/step   {runs[0]['trainable']}")
    (full_peak, full_added, full_step), (lora_peak, lora_added, lora_step) = summary["full"], summary["lora"]
    print(f"{'lora/full':>10}: peak RSS {lora_peak / full_peak:7.2f}x     over model {lora_added / full_added:6.2f}x     "
          f"{lora_step / full_step:7.2f}x")


if __name__ == "__main__":
    main()
