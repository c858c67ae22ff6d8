"""What --max-cpu does to a real run, and what monitoring costs.

    python benchmarks/resource_governor.py [--seconds 25] [--repeats 2] [--json out.json]

Runs scripts/train.py (the `small` preset on the built-in corpus) as a subprocess in three
settings, alternating them so machine noise hits each alike:
    default             monitoring on, no CPU limit
    --max-cpu 50        the governor holds the process at half of the machine
    --disable-monitoring  no sampling, no anomaly rules, no governor
The CPU share is measured from outside, with psutil on the child process (its CPU time over wall
time, divided by the number of cores), over the run's steady state (after the first seconds of
start-up); tokens/s is wall-clock throughput over the same steady state (tokens between the first
and last logged rows over the time between them, so the governor's pauses and the monitoring's
own work count). Medians over the repeats are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"default": [], "--max-cpu 50": ["--max-cpu", "50"], "--disable-monitoring": ["--disable-monitoring"]}


def measure(extra: list[str], seconds: float, workdir: Path, name: str, warmup: float) -> dict[str, float]:
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", "small", "--max-steps", "0",
               "--max-time", str(seconds), "--eval-steps", "100000", "--save-steps", "100000", "--log-steps", "2",
               "--output-dir", str(workdir), "--run-name", name, "--tokenizer-samples", "300", *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = psutil.Process(process.pid)
    metrics = workdir / name / "metrics.jsonl"
    while not metrics.exists() and process.poll() is None:  # start-up: tokenizer, model, first step
        time.sleep(0.1)
    time.sleep(warmup)
    start_wall = time.perf_counter()
    start_cpu = sum(child.cpu_times()[:2])
    time.sleep(max(1.0, seconds - warmup - 3))
    cpu = sum(child.cpu_times()[:2]) - start_cpu
    wall = time.perf_counter() - start_wall
    process.wait()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steady = [row for row in rows if row.get("type") == "train" and row["elapsed_seconds"] >= warmup]
    first, last = steady[0], steady[-1]
    tokens_per_second = (last["tokens"] - first["tokens"]) / (last["elapsed_seconds"] - first["elapsed_seconds"])
    return {"cpu_share_percent": 100 * cpu / wall / (psutil.cpu_count() or 1), "tokens_per_second": tokens_per_second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=25.0, help="training time budget of each run")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of each run left out of the CPU measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    arguments = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(arguments.repeats):
            for name, extra in SETTINGS.items():
                run_name = f"{name.strip('-').replace(' ', '-')}-{repeat}"
                results[name].append(measure(extra, arguments.seconds, Path(workdir), run_name, arguments.warmup))
    summary = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for name, runs in results.items()
    }
    baseline = summary["default"]["tokens_per_second"]
    print(f"{psutil.cpu_count()} cores, {arguments.repeats} alternating repeats of {arguments.seconds:g} s each (medians)")
    print(f"{'setting':<22} | {'CPU share of machine':>20} | {'tokens/s':>9} | {'vs default':>10}")
    for name, figures in summary.items():
        print(f"{name:<22} | {figures['cpu_share_percent']:>19.1f}% | {figures['tokens_per_second']:>9,.0f} | "
              f"{figures['tokens_per_second'] / baseline:>9.2f}x")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({"runs": results, "medians": summary}, indent=2))


if __name__ == "__main__":
    main()
