"""Measuring a model: loss, perplexity and bits per byte.

    loss           mean cross-entropy per predicted token, in nats
    perplexity     exp(loss): as unsure as a uniform choice among this many tokens
    bits per byte  total cross-entropy in bits divided by the UTF-8 bytes the targets stand for

and, token by token, `token_logprobs`: the log-probability of each token of one text given the
ones before it, and the likeliest alternatives (what `minigpt serve` answers to `logprobs`).

Loss and perplexity depend on the tokenizer (bigger tokens carry more text each, so their loss
is higher); bits per byte does not, so it compares runs with different tokenizers fairly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Sequence

import torch

from minigpt.distributed import all_reduce_sum, this_process_share
from minigpt.loss import IGNORE_INDEX
from minigpt.model import GPT
from minigpt.runtime import autocast


@dataclass
class EvaluationResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "val_loss": self.loss, "val_perplexity": self.perplexity, "val_bits_per_byte": self.bits_per_byte,
            "val_tokens": self.tokens,
        }


@torch.no_grad()
def evaluate(
    model: GPT,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_byte_lengths: torch.Tensor,
    max_batches: int = 0,
    dtype: torch.dtype = torch.float32,
) -> EvaluationResult:
    """Evaluate on up to `max_batches` (0 = all) batches of (inputs, targets). Under torchrun every
    process must call this, with the same batches: each evaluates its share."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    token_byte_lengths = token_byte_lengths.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = torch.zeros((), dtype=torch.long, device=device)
    total_bytes = torch.zeros((), dtype=torch.long, device=device)
    # Under torchrun each process takes every world_size-th of the same batches and the sums are
    # added up over the processes: the result is the single-process result on the same batches.
    for inputs, targets in this_process_share(islice(batches, max_batches or None)):
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, dtype):
            _, losses = model(inputs, targets, loss_reduction="none")
        counted = targets.view(-1) != IGNORE_INDEX
        total_nats += losses.double().sum()  # ignored positions contribute 0
        total_tokens += counted.sum()
        total_bytes += token_byte_lengths[targets.view(-1)[counted]].sum()
    model.train(was_training)
    for total in (total_nats, total_tokens, total_bytes):
        all_reduce_sum(total)
    tokens, byte_count = int(total_tokens), int(total_bytes)
    if tokens == 0:
        raise ValueError("Evaluation saw no target tokens: the validation data is empty.")
    loss = float(total_nats) / tokens
    bits_per_byte = float(total_nats) / math.log(2) / byte_count if byte_count else float("nan")
    return EvaluationResult(loss, math.exp(min(loss, 700.0)), bits_per_byte, tokens, byte_count)


@dataclass(frozen=True)
class TokenLogprob:
    """How likely the model found one token of a sequence, given the tokens before it."""

    token: int
    logprob: float | None  # natural log; None for the first token, which nothing comes before
    top: list[tuple[int, float]]  # the likeliest tokens at this place and their log-probabilities, likeliest first


@torch.no_grad()
def token_logprobs(model: GPT, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """Each token's log-probability under the model (the raw distribution: no temperature or
    filtering), from one forward pass over `ids` (at most the model's window)."""
    ids = list(ids)
    if not 0 < len(ids) <= model.config.block_size:
        raise ValueError(f"token_logprobs reads 1 to {model.config.block_size} tokens, got {len(ids)}")
    device = next(model.parameters()).device
    logits, _ = model(torch.tensor([ids], device=device))
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # row t: the distribution of token t + 1
    chosen = logprobs.gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()
    values, tokens = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long())
    alternatives = [list(zip(row_tokens, row_values)) for row_tokens, row_values in zip(tokens.tolist(), values.tolist())]
    return [TokenLogprob(ids[0], None, [])] + [TokenLogprob(token, logprob, best)
                                                for token, logprob, best in zip(ids[1:], chosen, alternatives)]
