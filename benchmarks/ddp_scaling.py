"""Tokens per second of one process against two torchrun processes, on this machine.

    python benchmarks/ddp_scaling.py [--config tiny] [--steps 40] [--rounds 2] [--batch-size 8]

Both train the same global batch: one process takes 2 micro-batches per step with all the
cores; two processes (gloo, `torchrun --standalone --nproc_per_node 2`) take one each with
half the cores (MiniGPT splits them: threads = cores // processes on the machine). Throughput
is the mean tokens/s of the logged train rows after the first (evaluation and saving excluded).

On a CPU, DDP cannot beat one process using the same cores: both use every core for the matrix
multiplies, and DDP adds a gradient all-reduce per step, over TCP, plus a second copy of the
Python overhead. What it buys is running on several machines. Timings on shared machines drift by
tens of percent, so the two set-ups run in alternating order and are averaged.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

import torch

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "scripts" / "train.py"


def throughput(processes: int, arguments: argparse.Namespace, workdir: Path, name: str) -> float:
    """Train once and return the mean tokens/s of its train rows after the first."""
    settings = ["--config", arguments.config, "--output-dir", str(workdir), "--run-name", name, "--max-steps", str(arguments.steps),
                "--batch-size", str(arguments.batch_size), "--gradient-accumulation-steps", str(2 // processes),
                "--log-steps", "5", "--eval-steps", str(10 * arguments.steps), "--save-steps", str(10 * arguments.steps),
                "--sample-tokens", "0", "--dtype", "float32", "--disable-monitoring"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    result = subprocess.run([*launcher, str(TRAIN), *settings], cwd=workdir, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        sys.exit(f"{processes} process(es) failed:\n{result.stderr[-2000:]}")
    rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    speeds = [row["tokens_per_second"] for row in rows if row["type"] == "train"]
    return mean(speeds[1:] or speeds)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    arguments = parser.parse_args()
    results: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        for round_number in range(arguments.rounds):
            order = (1, 2) if round_number % 2 == 0 else (2, 1)  # alternate: drift hits both alike
            for processes in order:
                value = throughput(processes, arguments, workdir, f"p{processes}-r{round_number}")
                results[processes].append(value)
                print(f"round {round_number}: {processes} process(es) {value:,.0f} tokens/s", flush=True)
    one, two = mean(results[1]), mean(results[2])
    print(f"\n{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, --config {arguments.config}")
    print(f"1 process : {one:,.0f} tokens/s")
    print(f"2 processes: {two:,.0f} tokens/s  ({two / one:.2f}x)")


if __name__ == "__main__":
    main()
