"""Packed chat fine-tuning against one conversation per row, on the built-in chat set.

    python benchmarks/sft_packing.py [--segment-seconds 15] [--rounds 8] [--block-size 512] [--batch-size 8]
                                     [--layers 2] [--width 128] [--dtype float32]

Two copies of the same small model (the same random start, the same seed; 2 layers of width 128
by default, so that a few minutes hold enough steps on a shared CPU) train on the built-in
chat set (`minigpt.sft_corpus`, assistant tokens only as targets) through the trainer's own
optimizer step, one on packed rows (several whole conversations per row, attention and positions
kept inside each: `--packing on`, the default) and one on one conversation per row (`--packing
off`). They take turns, --segment-seconds of training each per round (a segment ends with the
step that passes them), so both see the same machine load and about the same training time.
After each segment the model is evaluated on the same held-out conversations (one per row; the
loss per conversation is the same either way).

Printed: the CPU and the load average, then per round and layout the training seconds so far,
the assistant (loss-carrying) tokens per second of the segment, the mean training loss of its
steps and the validation loss: the loss curve against time. Last, how the rows were laid out
(conversations per row, the share of each row that is conversation and of the computed columns
that carry a loss), the ratio of assistant tokens per second, packed over one per row, and each
layout's last validation loss with its training seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from minigpt.data import TokenBlockStream  # noqa: E402
from minigpt.evaluation import evaluate  # noqa: E402
from minigpt.loss import IGNORE_INDEX  # noqa: E402
from minigpt.model import GPT  # noqa: E402
from minigpt.objective import LanguageModelObjective  # noqa: E402
from minigpt.runtime import configure_threads, machine_description, select_dtype  # noqa: E402
from minigpt.sft_corpus import BUILTIN_SFT, builtin_sft_conversations  # noqa: E402
from minigpt.tokenizer import train_bpe_tokenizer  # noqa: E402
from minigpt.trainer import Trainer  # noqa: E402

LAYOUTS = {"packed": dict(pack_documents=True), "one per row": dict(one_document_per_row=True)}
VAL_FRACTION = 0.05


class Contender:
    """One layout: its training stream, its model and trainer, and what it measured so far."""

    def __init__(self, name: str, config: RunConfig, tokenizer, device: torch.device, dtype: torch.dtype):
        train = config.train
        self.name = name
        self.stream = TokenBlockStream([BUILTIN_SFT], tokenizer, config.model.block_size, train.batch_size, split="train",
                                       val_fraction=VAL_FRACTION, shuffle_buffer=train.shuffle_buffer, seed=train.seed,
                                       assistant_only_loss=True, **LAYOUTS[name])
        self.batches = iter(self.stream)
        torch.manual_seed(0)  # both layouts start from the same weights
        self.model = GPT(config.model)
        self.objective = LanguageModelObjective(tokenizer, packed=name == "packed")
        self.trainer = Trainer(config, self.model, tokenizer, self.objective, None, None, tempfile.mkdtemp(), device, dtype,
                               show_progress=False)
        self.seconds = 0.0
        self.assistant_tokens = 0
        self.columns = 0
        self.val_loss = float("nan")
        # One untimed step: it fills the shuffle buffer (1,000 rows: for packed rows, more than a pass
        # over the set) and allocates AdamW's state, costs a run pays once.
        self.trainer.optimizer_step(self.model, [next(self.batches)], timed=False)

    def train_for(self, seconds: float) -> tuple[int, float, float]:
        """Optimizer steps for about `seconds` (reading the data counts); the steps, the assistant
        tokens per second and the mean training loss of the segment."""
        losses, tokens, started = [], 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            batch = next(self.batches)
            loss, _, _, _ = self.trainer.optimizer_step(self.model, [batch], timed=False)
            losses.append(float(loss))
            tokens += int((batch[1] != IGNORE_INDEX).sum())
            self.columns += batch[0].numel()
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        self.assistant_tokens += tokens
        return len(losses), tokens / elapsed, sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segment-seconds", type=float, default=15.0, help="training seconds of each layout per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=512, help="the row length (the medium preset's, the sft default)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128, help="n_embd (4 heads, 2 key/value heads)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = the physical cores)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: under autocast, weights float32")
    arguments = parser.parse_args()
    sizes = {"--segment-seconds": arguments.segment_seconds, "--rounds": arguments.rounds, "--block-size": arguments.block_size,
             "--batch-size": arguments.batch_size, "--layers": arguments.layers, "--width": arguments.width}
    if not_positive := [flag for flag, size in sizes.items() if size <= 0]:
        parser.error(f"{not_positive[0]} takes a number above 0")
    if arguments.width % 4:
        parser.error("--width must be a multiple of 4 (the model has 4 heads)")

    threads = configure_threads(arguments.threads)
    device = torch.device("cpu")
    dtype = select_dtype(arguments.dtype, device)
    conversations = builtin_sft_conversations()
    texts = (turn["content"] for record in conversations for turn in record["conversations"])
    tokenizer = train_bpe_tokenizer(texts, vocab_size=2048, show_progress=False)
    model = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=arguments.block_size, n_layer=arguments.layers, n_head=4,
                        n_kv_head=2, n_embd=arguments.width)
    config = RunConfig(model=model, train=TrainConfig(batch_size=arguments.batch_size, learning_rate=1e-3, warmup_steps=20,
                                                      max_steps=10_000, disable_monitoring=True, stage="sft"))
    contenders = [Contender(name, config, tokenizer, device, dtype) for name in LAYOUTS]
    val = TokenBlockStream([BUILTIN_SFT], tokenizer, arguments.block_size, 16, split="val", val_fraction=VAL_FRACTION, loop=False,
                           assistant_only_loss=True, one_document_per_row=True)

    print(f"CPU: {machine_description()['cpu']}; {threads} threads; {dtype}; torch {torch.__version__}; "
          f"load average before {os.getloadavg()[0]:.2f}")
    print(f"Built-in chat set: {len(conversations):,} conversations; model {contenders[0].model.num_parameters() / 1e6:.1f}M "
          f"parameters, rows of {arguments.block_size} tokens, {arguments.batch_size} rows per step")
    print(f"{'round':>5} {'layout':<12} {'steps':>5} {'train s':>8} {'assistant tok/s':>15} {'train loss':>10} {'val loss':>9}")
    for round_number in range(1, arguments.rounds + 1):
        for contender in contenders:
            steps, rate, loss = contender.train_for(arguments.segment_seconds)
            contender.val_loss = evaluate(contender.model, val, contender.objective.token_byte_lengths, dtype=dtype).loss
            print(f"{round_number:>5} {contender.name:<12} {steps:>5} {contender.seconds:>8.1f} {rate:>15,.0f} {loss:>10.4f} "
                  f"{contender.val_loss:>9.4f}", flush=True)

    for contender in contenders:
        report = contender.stream.report
        print(f"{contender.name}: {report.row_documents / report.rows:.2f} conversations per row, rows "
              f"{report.row_tokens / (report.rows * (arguments.block_size + 1)):.0%} conversation, "
              f"{contender.assistant_tokens / contender.columns:.0%} of the computed columns carry a loss")
    packed, own = contenders
    ratio = (packed.assistant_tokens / packed.seconds) / (own.assistant_tokens / own.seconds)
    print(f"Assistant tokens per second, packed / one per row: {ratio:.2f}x "
          f"({packed.assistant_tokens / packed.seconds:,.0f} vs {own.assistant_tokens / own.seconds:,.0f})")
    print(f"Validation loss after {packed.seconds:.0f} s and {own.seconds:.0f} s of training: packed {packed.val_loss:.4f}, "
          f"one per row {own.val_loss:.4f}; load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
