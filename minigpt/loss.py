"""The loss of next-token prediction, and the one constant every stage's data shares.

Cross-entropy compares the model's predicted distribution over the vocabulary with the token
that really came next: -log p(correct token), in nats. A target equal to IGNORE_INDEX is left
out entirely (PyTorch's own convention): that is how chat fine-tuning trains only on what the
assistant says, and how padding is kept out of a loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets equal to this are left out of the loss (prompt tokens in chat fine-tuning)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (batch, time, vocab) against targets (batch, time), computed in
    float32 (a low-precision softmax over a large vocabulary loses accuracy).

    reduction "mean" averages over counted targets, "sum" adds them (so a caller can divide by
    the targets of several micro-batches at once), "none" gives one value per position (0 where ignored).
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction,
    )
