"""The dry-run estimate against the measured peak of real runs, and what gradient checkpointing buys.

Each measurement is a fresh process (its peak resident memory is its own) that first works out
the estimate exactly as `minigpt train --dry-run` does, then trains `--steps` steps through
prepare_run and the Trainer on the built-in corpus, and reads the peak resident memory the run
itself logs (peak_rss_bytes in metrics.jsonl, the highest of its log intervals). Settings with
and without checkpointing alternate, so a shared machine's changing load falls on both alike.

For each run it prints the estimate, the measured peak, their ratio, the mean step time (first
step left out), and the allocator slack actually seen, in blocks' activations: (measured peak -
process - tensors) / one block's activations, the figure ALLOCATOR_SLACK_BLOCKS stands for.
Per preset it prints checkpointing's ratios of peak memory and step time.

    python benchmarks/memory.py                                   # tiny, small, medium at their preset batch
    python benchmarks/memory.py --presets small --batch 16 --dtypes float32 bfloat16 --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from minigpt.config import apply_overrides, preset_config
from minigpt.corpus import builtin_documents
from minigpt.memory import gb
from minigpt.metrics import read_metrics
from minigpt.run import plan_dry_run, prepare_run
from minigpt.tokenizer import train_bpe_tokenizer

PRESETS = ("tiny", "small", "medium")


def measure(preset: str, batch: int, dtype: str, checkpointing: bool, steps: int, tokenizer: str, output: str) -> dict[str, float]:
    """One process's run: the estimate, then the measured peak and step time."""
    config = apply_overrides(preset_config(preset), {
        "train.batch_size": batch, "train.dtype": dtype, "train.gradient_checkpointing": checkpointing,
        "train.max_steps": steps, "train.log_steps": 1, "train.save_steps": steps, "train.val_fraction": 0.0,
        "train.sample_tokens": 0, "train.plot_loss": False, "train.tokenizer_path": tokenizer, "train.output_dir": output,
        "train.run_name": f"{preset}-{batch}-{dtype}-{int(checkpointing)}",
    })
    estimate = plan_dry_run(config).estimate
    trainer = prepare_run(config, show_progress=False)
    trainer.train()
    rows = [row for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row.get("type") == "train"]
    peak = max(row["peak_rss_bytes"] for row in rows)
    tensors = estimate.tensors(checkpointing)
    return {"estimate": estimate.peak(checkpointing), "peak": peak, "process": estimate.process, "tensors": tensors,
            "slack_blocks": (peak - estimate.process - tensors) / estimate.block,
            "step_seconds": statistics.mean(row["step_ms"] / 1000 for row in rows[1:]) if len(rows) > 1 else rows[0]["step_ms"] / 1000}


def run_child(preset: str, batch: int, dtype: str, checkpointing: bool, steps: int, tokenizer: str, output: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", preset, str(batch), dtype, str(int(checkpointing)),
               "--steps", str(steps), "--tokenizer", tokenizer, "--output", output]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--batch", type=int, default=0, help="micro-batch for every preset (default: each preset's own)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (the peak settles after a few)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating pairs of runs per setting")
    parser.add_argument("--tokenizer", default="", help=argparse.SUPPRESS)
    parser.add_argument("--output", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=4, metavar=("PRESET", "BATCH", "DTYPE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        preset, batch, dtype, checkpointing = arguments.child
        print(json.dumps(measure(preset, int(batch), dtype, checkpointing == "1", arguments.steps, arguments.tokenizer, arguments.output)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        tokenizers = {}
        for preset in arguments.presets:  # trained once per vocabulary size, on the built-in corpus the runs read
            size = preset_config(preset).train.tokenizer_vocab_size
            if size not in tokenizers:
                tokenizers[size] = str(Path(scratch) / f"tokenizer-{size}.json")
                train_bpe_tokenizer(builtin_documents(), vocab_size=size, show_progress=False).save(tokenizers[size])
        print(f"{'preset':<7} {'batch':>5} {'dtype':<9} {'checkpointing':>13} {'estimate':>10} {'peak':>10} {'ratio':>6} "
              f"{'slack (blocks)':>14} {'step s':>7}")
        for preset in arguments.presets:
            batch = arguments.batch or preset_config(preset).train.batch_size
            tokenizer = tokenizers[preset_config(preset).train.tokenizer_vocab_size]
            for dtype in arguments.dtypes:
                results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
                for _ in range(arguments.repeats):
                    for checkpointing in (False, True):
                        result = run_child(preset, batch, dtype, checkpointing, arguments.steps, tokenizer, str(Path(scratch) / "runs"))
                        results[checkpointing].append(result)
                        print(f"{preset:<7} {batch:>5} {dtype:<9} {'on' if checkpointing else 'off':>13} {gb(result['estimate']):>10} "
                              f"{gb(result['peak']):>10} {result['estimate'] / result['peak']:>6.2f} {result['slack_blocks']:>14.1f} "
                              f"{result['step_seconds']:>7.2f}", flush=True)
                peak = {setting: statistics.median(r["peak"] for r in rows) for setting, rows in results.items()}
                seconds = {setting: statistics.median(r["step_seconds"] for r in rows) for setting, rows in results.items()}
                print(f"{preset} {dtype}: with checkpointing, peak memory x{peak[True] / peak[False]:.2f}, "
                      f"step time x{seconds[True] / seconds[False]:.2f}")


if __name__ == "__main__":
    main()
