"""Sampling text from a trained model, one token at a time.

Each step turns the model's last-position logits into a probability distribution and draws
the next token from it. The knobs, applied in this order:
    repetition_penalty  makes tokens already in the context less likely (> 1 discourages)
    temperature         sharpens (< 1) or flattens (> 1) the distribution; 0 means greedy
    top_k               keeps only the k most likely tokens
    top_p               keeps the smallest set of tokens whose probabilities add up to p
With `use_kv_cache` the model keeps the keys and values of past tokens and only processes the
new token at each step, instead of the whole context again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from minigpt.model import GPT, KVCache
from minigpt.tokenizer import Tokenizer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1.0 = no nucleus filtering
    repetition_penalty: float = 1.0  # 1.0 = no penalty
    seed: int | None = None  # None = a different sample each call
    stop_ids: tuple[int, ...] = ()  # generation ends at any of these (the stop token is not returned)
    use_kv_cache: bool = True


def next_token_distribution(logits: torch.Tensor, context: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Probabilities for the next token from a 1-D logits vector; `context` is the ids so far."""
    logits = logits.float().clone()
    if sampling.repetition_penalty != 1.0 and context.numel():
        # CTRL-style: shrink positive logits and push negative ones further down for seen tokens.
        seen = torch.unique(context)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / sampling.repetition_penalty, values * sampling.repetition_penalty)
    if sampling.temperature == 0:
        probabilities = torch.zeros_like(logits)
        probabilities[logits.argmax()] = 1.0
        return probabilities
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.numel():
        kth_largest = torch.topk(logits, sampling.top_k).values[-1]
        logits[logits < kth_largest] = float("-inf")
    probabilities = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probabilities, order = torch.sort(probabilities, descending=True)
        # Drop a token when the tokens more likely than it already cover top_p.
        drop = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities >= sampling.top_p
        sorted_probabilities[drop] = 0.0
        probabilities = torch.zeros_like(probabilities).scatter(0, order, sorted_probabilities)
        probabilities /= probabilities.sum()
    return probabilities


@torch.no_grad()
def stream_tokens(model: GPT, prompt_ids: Sequence[int], sampling: SamplingConfig) -> Iterator[int]:
    """Yield generated token ids one by one as they are sampled."""
    if not prompt_ids:
        raise ValueError("Generation needs at least one prompt token (for example the end-of-text id).")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    window = model.config.block_size
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    tokens = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    cache: KVCache | None = None
    try:
        for _ in range(sampling.max_new_tokens):
            if sampling.use_kv_cache and cache is not None and cache.length < window:
                logits, _ = model(tokens[-1:].view(1, 1), cache=cache)  # only the newest token
            else:
                # First step, no cache, or the window is full: run the last `window` tokens whole.
                # Past the window, positions shift every step, so cached keys cannot be reused.
                if sampling.use_kv_cache:
                    cache = KVCache(model.config, 1, device, model.token_embedding.weight.dtype)
                logits, _ = model(tokens[-window:].view(1, -1), cache=cache)
            probabilities = next_token_distribution(logits[0, -1], tokens, sampling)
            next_id = int(torch.multinomial(probabilities, 1, generator=generator))
            if next_id in sampling.stop_ids:
                return
            tokens = torch.cat([tokens, tokens.new_tensor([next_id])])
            yield next_id
    finally:
        model.train(was_training)


def generate(model: GPT, prompt_ids: Sequence[int], sampling: SamplingConfig) -> list[int]:
    """The generated ids (prompt excluded) as a list."""
    return list(stream_tokens(model, prompt_ids, sampling))


def print_streamed(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Print tokens to stdout as they come and return the whole text. A byte-level token can end
    inside a multi-byte character, so decode everything so far and print only the new, complete part."""
    generated: list[int] = []
    shown = ""
    for token in ids:
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    text = tokenizer.decode(generated)
    sys.stdout.write(text[len(shown):] + "\n")
    sys.stdout.flush()
    return text
