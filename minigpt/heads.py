"""Classification heads on the trunk: reading what the model "thinks" of a whole text.

The trunk (`GPT.hidden_states`) turns every position into a vector. A classifier needs one vector
per text, so the positions are pooled:

    last   the vector at the last real (non-pad) token. With causal attention that position has
           seen the whole text, and it is where a language model "sums up" before predicting.
    mean   the average over the real tokens: every token votes equally (often better for a
           model trained from scratch, which has not learned to sum up yet).
    max    each feature's largest value over the real tokens: "does any token say X?", as in a
           convolutional text classifier. One telling word anywhere in a long text counts fully,
           where a mean would dilute it among all the others.

Then one linear layer per task maps the pooled vector to that task's class scores (logits).
Padding sits to the right of the text and attention is causal, so pads never reach a real
token's vector: a text gets exactly the same logits alone or in a padded batch.

A classifier keeps its language-model head (by default tied to the token embeddings), so the same pass can
also score the next token of each text: the auxiliary loss a model trained from scratch learns
language from while it learns the labels (`--lm-loss-weight`; GPT-1 fine-tuned this way).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minigpt.config import RunConfig
from minigpt.loss import IGNORE_INDEX, next_token_loss
from minigpt.model import GPT

POOLINGS = ("last", "mean", "max")
LM_ROWS_STEP = 512  # the auxiliary next-token loss scores its positions in groups of this many rows


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row of hidden (batch, time, width), from its first `lengths` positions."""
    if pooling == "last":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
    real = torch.arange(hidden.size(1), device=hidden.device)[None, :] < lengths[:, None]
    if pooling == "max":
        return hidden.masked_fill(~real[:, :, None], float("-inf")).amax(1)
    return (hidden * real[:, :, None].to(hidden.dtype)).sum(1) / lengths[:, None].to(hidden.dtype)


class GPTClassifier(GPT):
    """The GPT trunk plus one linear head per task. The trunk's weights keep GPT's names, so a
    pretrained model's weights load into it unchanged (`--init-from`); only `heads.*` are new."""

    def __init__(self, config: RunConfig):
        super().__init__(config.model)
        self.pooling = config.train.pooling
        self.label_maps = config.train.label_maps
        self.heads = nn.ModuleDict({task: nn.Linear(config.model.n_embd, len(labels)) for task, labels in self.label_maps.items()})
        for head in self.heads.values():
            nn.init.normal_(head.weight, mean=0.0, std=0.02)
            nn.init.zeros_(head.bias)
        if not config.model.tie_embeddings and not config.train.lm_loss_weight:
            # The language-model head is kept (a pretrained model loads whole) but unused without
            # --lm-loss-weight, so it does not train; frozen, it is no gradient DDP would wait for.
            self.lm_head.requires_grad_(False)

    def classify(
        self, idx: torch.Tensor, lengths: torch.Tensor, language_model_loss: bool = False
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each task's logits (batch, classes) for right-padded token ids and their lengths. With
        `language_model_loss`, also the language model's mean next-token loss over the texts: only
        positions whose next token is real text are scored."""
        hidden = self.hidden_states(idx)
        pooled = pool(hidden, lengths, self.pooling)
        logits = {task: head(pooled) for task, head in self.heads.items()}
        if not language_model_loss:
            return logits
        followed = torch.arange(idx.size(1) - 1, device=idx.device)[None, :] < lengths[:, None] - 1
        scored, targets = hidden[:, :-1][followed], idx[:, 1:][followed]
        # The count of scored positions changes with every batch, and a CPU's oneDNN keeps a compiled
        # kernel per matrix shape (bfloat16 autocast: +17 MB per step, without end). Padding the rows
        # to a multiple of LM_ROWS_STEP (ignored targets, so the sum is unchanged) leaves few shapes.
        padding = -scored.size(0) % LM_ROWS_STEP
        scored = nn.functional.pad(scored, (0, 0, 0, padding))
        targets = nn.functional.pad(targets, (0, padding), value=IGNORE_INDEX)
        summed = next_token_loss(self.lm_head(scored), targets, reduction="sum")
        return logits, summed / followed.sum().clamp(min=1)  # a batch of one-token texts predicts nothing: 0, not NaN

    def forward(  # type: ignore[override]
        self, idx: torch.Tensor, lengths: torch.Tensor, language_model_loss: bool = False
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`classifier(ids, lengths)` is `classify`: training calls the model this way, since
        DistributedDataParallel and torch.compile wrap forward() and no other method (a method
        called through them would skip the gradient all-reduce, or the compiled code)."""
        return self.classify(idx, lengths, language_model_loss)

    def freeze_trunk(self) -> None:
        """Train only the heads (a linear probe): what the trunk already knows, read out linearly."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name.startswith("heads."))


def build_classifier(config: RunConfig) -> GPTClassifier:
    """A new classifier for `config` (its label maps give the heads' sizes), its trunk frozen
    with config.train.freeze_trunk (the trunk's weights are then loaded from --init-from)."""
    model = GPTClassifier(config)
    if config.train.freeze_trunk:
        model.freeze_trunk()
    return model
