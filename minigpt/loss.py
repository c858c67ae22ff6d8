"""The loss of next-token prediction, and the one constant every stage's data shares.

Cross-entropy compares the model's predicted distribution over the vocabulary with the token
that really came next: -log p(correct token), in nats. A target equal to IGNORE_INDEX is left
out entirely (PyTorch's own convention): that is how chat fine-tuning trains only on what the
assistant says, and how padding is kept out of a loss.

A large vocabulary makes the logits the largest tensor of a step: Gemma 3's 262k tokens x 8
sequences x 512 positions are 4.3 GB of float32 logits, kept for the backward pass along with
their log-softmax. `chunked_next_token_loss` computes the same loss a slice of positions at a
time and recomputes each slice's logits in the backward pass instead of keeping them, so at
most `LOSS_CHUNK_BYTES` of float32 logits exist at once. Below that size (MiniGPT's own
vocabularies at ordinary batches) the model computes all logits at once, as before.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets equal to this are left out of the loss (prompt tokens in chat fine-tuning)
LOSS_CHUNK_BYTES = 256 * 2**20  # float32 logits above this are computed a slice of positions at a time


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (batch, time, vocab) against targets (batch, time), computed in
    float32 (a low-precision softmax over a large vocabulary loses accuracy).

    reduction "mean" averages over counted targets, "sum" adds them (so a caller can divide by
    the targets of several micro-batches at once), "none" gives one value per position (0 where ignored).
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction,
    )


def loss_chunk_positions(positions: int, vocab_size: int) -> int:
    """How many positions' float32 logits fit in LOSS_CHUNK_BYTES (all of them when they fit at once)."""
    per_position = 4 * vocab_size
    if positions * per_position <= LOSS_CHUNK_BYTES:
        return positions
    return max(1, LOSS_CHUNK_BYTES // per_position)


def chunked_next_token_loss(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, chunk: int, reduction: str = "mean",
) -> torch.Tensor:
    """`next_token_loss(head(hidden), targets, reduction)`, `chunk` positions at a time.

    While gradients are recorded each slice runs under activation checkpointing: only its input
    (the hidden states, which the head keeps anyway) is saved, and the backward pass recomputes
    its logits, one slice alive at a time. The price is one more pass through the head.
    """
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)

    def slice_loss(part: torch.Tensor, part_targets: torch.Tensor) -> torch.Tensor:
        summed = reduction == "mean"
        return F.cross_entropy(head(part).float(), part_targets, ignore_index=IGNORE_INDEX, reduction="sum" if summed else reduction)

    pieces = []
    for start in range(0, targets.numel(), chunk):
        part, part_targets = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(slice_loss, part, part_targets, use_reentrant=False))
        else:
            pieces.append(slice_loss(part, part_targets))
    if reduction == "none":
        return torch.cat(pieces)
    total = torch.stack(pieces).sum()
    return total / (targets != IGNORE_INDEX).sum() if reduction == "mean" else total
