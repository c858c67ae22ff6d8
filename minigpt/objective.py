"""What a batch means: the objective of a training stage.

The trainer only moves batches, steps the optimizer, saves and reports. Everything that depends
on what is being learned lives in an objective:

    weight(batch)            how much the batch counts: the loss of a step is divided by the
                             total weight of its micro-batches (for a language model, the
                             targets that are not IGNORE_INDEX), so accumulating k micro-batches
                             gives the gradient of one k-times larger batch
    loss(model, batch)       the summed loss of the batch (not yet divided by anything)
    tokens(batch)            what the throughput counts
    evaluate(model, batches) a dict of metrics on held-out data, with any sample to show
    monitor                  the metric that decides "better": early stopping, the best
                             checkpoint kept by pruning, the best in summary.json and the monitor
    example_batch(b, t)      a batch of the right shape and kind, for precision probes,
                             compilation and benchmarks

Pretraining and chat fine-tuning are the same objective: next-token prediction. Chat data
simply arrives with the prompt's targets set to IGNORE_INDEX, so only the assistant's words count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from minigpt.evaluation import evaluate
from minigpt.generation import SamplingConfig, complete
from minigpt.loss import IGNORE_INDEX
from minigpt.tokenizer import Tokenizer

Batch = Any  # whatever the objective's data stream yields; a language model's is (inputs, targets)


@dataclass(frozen=True)
class Monitor:
    """The metric that says which evaluation was best, and which way is better."""

    metric: str = "val_loss"
    mode: str = "min"  # "min": lower is better (a loss); "max": higher is better (an F1 score)

    def improves(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        return best is None or (value < best if self.mode == "min" else value > best)


class Objective:
    """The interface the trainer calls. Subclasses fill in each method for one kind of training."""

    monitor = Monitor()

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        """The batch on `device`, laid out contiguously: a compiled model is specialised to its
        inputs' memory layout, and a batch laid out differently would make it compile again."""
        return tuple(tensor.to(device, non_blocking=True).contiguous() for tensor in batch)

    def weight(self, batch: Batch) -> int:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def tokens(self, batch: Batch) -> int:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, batches: Iterable[Batch], max_batches: int, dtype: torch.dtype) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self, metrics: dict[str, Any]) -> str:
        """One line for the log at an evaluation."""
        raise NotImplementedError

    def example_batch(self, batch_size: int, block_size: int) -> Batch:
        raise NotImplementedError


class LanguageModelObjective(Objective):
    """Next-token prediction: pretraining, and chat fine-tuning on masked conversations.

    At each evaluation: validation loss, perplexity and bits per byte, and a sample, started
    from the start of a new document or, with `sample_chat_prompt`, a reply to that message.
    """

    def __init__(self, tokenizer: Tokenizer, sample_tokens: int = 0, seed: int = 0, sample_chat_prompt: str = ""):
        self.tokenizer = tokenizer
        self.token_byte_lengths = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long)
        self.sample_tokens, self.seed, self.sample_chat_prompt = sample_tokens, seed, sample_chat_prompt

    def weight(self, batch: Batch) -> int:
        _, targets = batch
        return int((targets != IGNORE_INDEX).sum())

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        _, loss = model(inputs, targets, loss_reduction="sum")
        return loss

    def tokens(self, batch: Batch) -> int:
        inputs, _ = batch
        return inputs.numel()

    def evaluate(self, model: torch.nn.Module, batches: Iterable[Batch], max_batches: int, dtype: torch.dtype) -> dict[str, Any]:
        metrics: dict[str, Any] = evaluate(model, batches, self.token_byte_lengths, max_batches, dtype).as_dict()
        if self.sample_tokens:
            metrics["sample"] = self.sample(model)
        return metrics

    def sample(self, model: torch.nn.Module) -> str:
        """A short generation to read at each evaluation (fixed seed: samples differ only because the model did)."""
        chat = bool(self.sample_chat_prompt)
        sampling = SamplingConfig(max_new_tokens=self.sample_tokens, temperature=0.8, top_k=50, seed=self.seed,
                                  stop_ids=self.tokenizer.stop_ids(chat))
        if chat:
            prompt = self.tokenizer.chat_prompt([{"role": "user", "content": self.sample_chat_prompt}])
        else:
            prompt = self.tokenizer.encode_prompt("")  # the start of a new document
        return complete(model, self.tokenizer, prompt, sampling)

    def describe(self, metrics: dict[str, Any]) -> str:
        return (f"val loss {metrics['val_loss']:.4f} | perplexity {metrics['val_perplexity']:.2f} | "
                f"{metrics['val_bits_per_byte']:.4f} bits/byte")

    def example_batch(self, batch_size: int, block_size: int) -> Batch:
        """Random tokens from a fixed generator, shifted as the data stream shifts them."""
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.tokenizer.vocab_size, (batch_size, block_size + 1), generator=generator)
        return tokens[:, :-1], tokens[:, 1:]
