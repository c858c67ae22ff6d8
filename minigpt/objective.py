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
    log_metrics()            what it measured on the training batches since the last train row,
                             for the next one (most objectives measure only the loss: nothing)
    example_batch(b, t)      a batch of the right shape and kind, for precision probes,
                             compilation and benchmarks
    rows_per_example         rows the model runs per example of a batch (a preference pair: two),
                             for the memory estimates of --dry-run and --batch-size auto

Pretraining and chat fine-tuning are the same objective: next-token prediction. Chat data
simply arrives with the prompt's targets set to IGNORE_INDEX, so only the assistant's words count.
Preference tuning (DPO) is `Preference`: a batch is pairs of replies, and the loss asks the model
to raise the chosen reply's likelihood over the rejected one's, relative to a reference model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from minigpt.distributed import sum_over_processes, this_process_share
from minigpt.evaluation import evaluate
from minigpt.generation import SamplingConfig, complete
from minigpt.loss import IGNORE_INDEX
from minigpt.runtime import autocast
from minigpt.tokenizer import Tokenizer

Batch = Any  # whatever the objective's data stream yields; a language model's is (inputs, targets[, positions])


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
    rows_per_example = 1  # rows of up to block_size tokens the model runs per example of a batch (memory estimates)

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

    def log_metrics(self) -> dict[str, float]:
        """What the objective measured on the training batches since the last call, averaged, for
        the next train row; then forgotten. Under torchrun every process calls it at the same step."""
        return {}

    def describe_log(self, metrics: dict[str, float]) -> str:
        """What the log line of a train row adds for `log_metrics`'s numbers ("" for none)."""
        return ""

    def example_batch(self, batch_size: int, block_size: int) -> Batch:
        raise NotImplementedError


class LanguageModelObjective(Objective):
    """Next-token prediction: pretraining, and chat fine-tuning on masked conversations.

    At each evaluation: validation loss, perplexity and bits per byte, and a sample, started
    from the start of a new document or, with `sample_chat_prompt`, a reply to that message.

    A batch is (inputs, targets), or with `packed` rows (several conversations in a row, packed
    chat fine-tuning) (inputs, targets, positions): each token's position in its conversation,
    which the model restarts its positions and attention at. The loss is summed over the batch's
    targets and the trainer divides by their number over the step, packed or not: every
    assistant token weighs the same, so the loss of a set of conversations is the same in
    packed rows as in rows of their own.
    """

    def __init__(self, tokenizer: Tokenizer, sample_tokens: int = 0, seed: int = 0, sample_chat_prompt: str = "",
                 packed: bool = False):
        self.tokenizer, self.packed = tokenizer, packed
        self.token_byte_lengths = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long)
        self.sample_tokens, self.seed, self.sample_chat_prompt = sample_tokens, seed, sample_chat_prompt

    def weight(self, batch: Batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        inputs, targets, *positions = batch
        _, loss = model(inputs, targets, loss_reduction="sum", positions=positions[0] if positions else None)
        return loss

    def tokens(self, batch: Batch) -> int:
        return batch[0].numel()

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
        """Random tokens from a fixed generator, shifted as the data stream shifts them; packed,
        each row holds two sequences (the mask and the positions cost what real ones do)."""
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.tokenizer.vocab_size, (batch_size, block_size + 1), generator=generator)
        if not self.packed:
            return tokens[:, :-1], tokens[:, 1:]
        half = block_size // 2
        positions = torch.cat([torch.arange(half), torch.arange(block_size - half)]).expand(batch_size, -1)
        return tokens[:, :-1], tokens[:, 1:], positions


def reply_log_probs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(reply | prompt) of each reply: the log-probabilities of its scored tokens (targets
    that are not IGNORE_INDEX), summed, in float32. inputs and targets (pairs, 2, time) -> (pairs, 2)."""
    pairs, replies, time = inputs.shape
    _, token_losses = model(inputs.reshape(-1, time), targets.reshape(-1, time), loss_reduction="none")
    return -token_losses.view(pairs, replies, time).sum(-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's loss of each pair and the rewards of its two replies, from the log-probabilities
    (pairs, 2) of the chosen ([:, 0]) and rejected ([:, 1]) reply under the model and the reference.

    A reply's implicit reward is beta x log(pi(y|x) / pi_ref(y|x)); the loss is
    -log sigmoid(reward_chosen - reward_rejected): the Bradley-Terry probability that the chosen
    reply wins, made as high as it can be. At the start the model is the reference, both rewards
    are 0 and the loss is -log sigmoid(0) = ln 2."""
    rewards = beta * (policy - reference)
    return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards


# What Preference measures per pair, in order: averaged over the pairs of a train row's steps
# (with the train row's own names) and of an evaluation (with "val_" before them).
PREFERENCE_METRICS = ("loss", "dpo_loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "logps_chosen",
                      "logps_rejected", "nll_chosen")


class Preference(Objective):
    """Direct preference optimisation (DPO, Rafailov et al. 2023), with RPO's extra term.

    A batch is pairs of replies to one prompt, the chosen one preferred (`PreferenceBatch`), with
    the reference model's log-probability of each reply computed before training. The loss of a
    pair is `dpo_loss`, plus, with `rpo_alpha`, that much of the chosen reply's mean negative
    log-likelihood per token (RPO, Pang et al. 2024: it keeps the chosen reply likely while the
    margin grows, where pure DPO can push both replies down). The trainer divides the summed loss
    by the pairs of the step.

    Per train row and evaluation: the loss, the DPO term alone (dpo_loss), the rewards of both
    replies and their margin, the preference accuracy (the share of pairs whose chosen reply has
    the higher reward, a tie counting half: 0.5 at the start, where the model is its reference,
    as for a coin; TRL counts a tie as wrong) and the model's log-probabilities of both replies. The validation
    preference accuracy (val_accuracy) decides "better".
    """

    monitor = Monitor("val_accuracy", "max")
    rows_per_example = 2  # both replies of a pair

    def __init__(self, beta: float, rpo_alpha: float = 0.0, vocab_size: int = 4):
        self.beta, self.rpo_alpha, self.vocab_size = beta, rpo_alpha, vocab_size
        self.window: torch.Tensor | None = None  # the sums of PREFERENCE_METRICS since the last train row, and the pairs

    def weight(self, batch: Batch) -> int:
        inputs, _, _ = batch
        return inputs.size(0)

    def pair_terms(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Every metric of PREFERENCE_METRICS for each pair of the batch, (len(PREFERENCE_METRICS), pairs);
        the first row, the loss, carries the gradient."""
        inputs, targets, reference = batch
        policy = reply_log_probs(model, inputs, targets)
        losses, rewards = dpo_loss(policy, reference, self.beta)
        nll_chosen = -policy[:, 0] / (targets[:, 0] != IGNORE_INDEX).sum(-1)
        margin = (rewards[:, 0] - rewards[:, 1]).detach()
        return torch.stack([losses + self.rpo_alpha * nll_chosen if self.rpo_alpha else losses, losses.detach(),
                            rewards[:, 0].detach(), rewards[:, 1].detach(), margin, (margin > 0) + 0.5 * (margin == 0),
                            policy[:, 0].detach(), policy[:, 1].detach(), nll_chosen.detach()])

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        terms = self.pair_terms(model, batch)
        sums = torch.cat([terms.detach().sum(-1), terms.new_tensor([terms.size(1)])])
        self.window = sums if self.window is None else self.window + sums
        return terms[0].sum()

    def tokens(self, batch: Batch) -> int:
        inputs, _, _ = batch
        return inputs.numel()

    def log_metrics(self) -> dict[str, float]:
        if self.window is None:
            return {}
        *sums, pairs = sum_over_processes(*self.window.tolist(), device=self.window.device)
        self.window = None
        # "loss" is the train row's already; dpo_beta is there for the anomaly rules' advice.
        return {**{name: total / pairs for name, total in zip(PREFERENCE_METRICS[1:], sums[1:])}, "dpo_beta": self.beta}

    def describe_log(self, metrics: dict[str, float]) -> str:
        return f" | dpo {metrics['dpo_loss']:.4f} | margin {metrics['margin']:.3f} | acc {metrics['accuracy']:.2f}" if metrics else ""

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[Batch], max_batches: int, dtype: torch.dtype) -> dict[str, Any]:
        """The mean of each of PREFERENCE_METRICS over the validation pairs, named val_<metric>.
        Under torchrun every process must call this with the same batches: each evaluates its
        share and the sums are added up."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        sums = torch.zeros(len(PREFERENCE_METRICS) + 1, dtype=torch.float64, device=device)
        for batch in this_process_share(islice(batches, max_batches or None)):
            batch = self.to_device(batch, device)
            with autocast(device, dtype):
                terms = self.pair_terms(model, batch)
            sums += torch.cat([terms.double().sum(-1), terms.new_tensor([terms.size(1)], dtype=torch.float64)])
        model.train(was_training)
        *totals, pairs = sum_over_processes(*sums.tolist(), device=device)
        if not pairs:
            raise ValueError("Evaluation saw no preference pairs: the validation data is empty.")
        return {f"val_{name}": total / pairs for name, total in zip(PREFERENCE_METRICS, totals)}

    def describe(self, metrics: dict[str, Any]) -> str:
        return (f"val loss {metrics['val_loss']:.4f} | dpo {metrics['val_dpo_loss']:.4f} | preference accuracy "
                f"{metrics['val_accuracy']:.3f} | margin {metrics['val_margin']:.3f} | rewards chosen "
                f"{metrics['val_rewards_chosen']:.3f} rejected {metrics['val_rewards_rejected']:.3f}")

    def example_batch(self, batch_size: int, block_size: int) -> Batch:
        """Random pairs from a fixed generator, the second half of each row scored, the reference at 0."""
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.vocab_size, (batch_size, 2, block_size + 1), generator=generator)
        targets = tokens[..., 1:].clone()
        targets[..., : block_size // 2] = IGNORE_INDEX
        return tokens[..., :-1].contiguous(), targets, torch.zeros(batch_size, 2)
