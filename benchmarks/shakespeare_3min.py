"""Three minutes of training on Tiny Shakespeare, end to end: how good a model does a CPU make?

    python benchmarks/shakespeare_3min.py --data tinyshakespeare.txt --output-dir DIR [--seconds 164] [--eager]
        [--set KEY=VALUE ...]

The first 90% of the file is the training data and the last 10% the validation data (written to
DIR as train.txt and val.txt). The run trains a 512-token BPE tokenizer, then the model below
for a wall-clock budget of --seconds (compilation, training and the evaluation at the end count),
with the learning rate decaying on that clock. It leaves the run in
DIR/runs/shakespeare-3min-<time>/ (with final_model/) and prints the validation bits per byte
over the whole validation file: the same figure `scripts/evaluate.py <that run>/final_model
--data-files DIR/val.txt` prints.

The settings are the ones that learned fastest per second on a 2-core CPU: a small, wide-enough
model (4 layers of width 128) that takes many steps of 16 sequences, a BPE vocabulary small
enough that every token is seen often, Muon for the blocks' matrices (AdamW for the rest), a high
learning rate (5e-3) that decays to 1e-4 by the end of the budget, and torch.compile (its 5-40 s
of compiling pay for themselves within the three minutes). The precision is --dtype auto's:
bfloat16 autocast where the CPU multiplies it fast.

Measured on a 2-core AMD EPYC (AVX512-BF16), idle, bits/byte over the whole validation file (one
run each unless two are given; runs of one setting differ by up to 0.015): learning rate 3e-3
decaying to 3e-4 2.170; 5e-3 to 3e-4 2.140; 5e-3 to 1e-4 2.134 and 2.123; 8e-3 to 3e-4 2.209.
Then, with bfloat16: batch 32 2.123, batch 16 2.107 and 2.121; batch 16 with Muon 2.101 and
2.108 (its orthogonalisation costs about a sixth of the steps); batch 32 with Muon 2.106. Dropout
0.1 (2.418), width 192 (2.278), blocks of 256 tokens at batch 16 (2.133) and a vocabulary of 1,024
(2.136) did worse.

On that CPU --dtype auto's probe sits near its margin at this shape: it timed bfloat16 at 72-79%
of float32's step (the margin is 75%), so a busy machine may train in float32, at about 60% of the
tokens/s and 0.01-0.05 bits/byte worse (the log's "CPU precision" line says which).
--set train.dtype=bfloat16 pins it for comparisons.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt.files import atomic_write_bytes  # noqa: E402
from minigpt.cli.common import setup_logging  # noqa: E402
from minigpt.config import apply_overrides, preset_config  # noqa: E402
from minigpt.data import TokenBlockStream  # noqa: E402
from minigpt.errors import UserInputError  # noqa: E402
from minigpt.evaluation import evaluate  # noqa: E402
from minigpt.run import prepare_run  # noqa: E402

SETTINGS = {
    "model.n_layer": 4, "model.n_head": 4, "model.n_kv_head": 4, "model.n_embd": 128, "model.block_size": 128,
    "train.tokenizer_type": "bpe", "train.tokenizer_vocab_size": 512, "train.batch_size": 16,
    "train.optimizer": "muon", "train.learning_rate": 5e-3, "train.min_learning_rate": 1e-4, "train.warmup_steps": 50, "train.max_steps": 0,
    "train.eval_steps": 1_000_000, "train.save_steps": 1_000_000, "train.log_steps": 50, "train.sample_tokens": 0,
    "train.shuffle_buffer": 256,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seconds", type=float, default=164.0, help="the training budget, compilation included")
    parser.add_argument("--eager", action="store_true", help="do not torch.compile the model (compiling counts against the budget)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="try another setting instead of the one below, e.g. --set model.dropout=0.1 (repeatable)")
    arguments = parser.parse_args()
    changed = dict(assignment.partition("=")[::2] for assignment in arguments.set)
    if "" in changed or "" in changed.values():
        parser.error("--set takes KEY=VALUE, for example --set model.n_embd=192")
    if not Path(arguments.data).is_file():
        parser.error(f"--data {arguments.data} is not a file: give the path of tinyshakespeare.txt")
    setup_logging()
    start = time.perf_counter()

    output = Path(arguments.output_dir)
    text = Path(arguments.data).read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    atomic_write_bytes(output / "train.txt", text[:split].encode("utf-8"))
    atomic_write_bytes(output / "val.txt", text[split:].encode("utf-8"))

    try:
        config = apply_overrides(preset_config("tiny"), {
            **SETTINGS, **changed, "train.data_files": [str(output / "train.txt")], "train.val_data_files": [str(output / "val.txt")],
            "train.max_time": arguments.seconds, "train.compile": not arguments.eager,
            "train.output_dir": str(output / "runs"), "train.run_name": f"shakespeare-3min-{int(time.time())}",
        })
        trainer = prepare_run(config, show_progress=False)  # checks the values too (train.optimizer=sgd, say)
    except UserInputError as error:  # an unknown --set key or a value it cannot take: the config's one sentence
        parser.error(str(error))
    summary = trainer.train()

    # The whole validation file, exactly as scripts/evaluate.py reads it.
    stream = TokenBlockStream([output / "val.txt"], trainer.tokenizer, trainer.model.config.block_size, 8, split="all", loop=False)
    result = evaluate(trainer.model, stream, torch.tensor(trainer.tokenizer.token_byte_lengths()))
    total = time.perf_counter() - start
    print(f"steps {summary['steps']:,} | tokens {summary['tokens']:,} | training {summary['training_seconds']:.1f} s | "
          f"{summary['tokens_per_second']:,.0f} tokens/s")
    print(f"validation: {result.loss:.4f} nats/token, {result.bits_per_byte:.4f} bits/byte (whole file, {result.tokens:,} tokens)")
    print(f"benchmark total {total:.1f} s; model in {trainer.run_dir / 'final_model'}")


if __name__ == "__main__":
    main()
