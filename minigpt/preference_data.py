"""Preference data: pairs of replies to one prompt, the chosen one better than the rejected one.

A .jsonl file (one record per line) or a .json file (an array of records), each in one of three forms:

    {"prompt": "...", "chosen": "...", "rejected": "..."}          strings: the prompt is a user
                                                                   turn; an optional "system"
                                                                   string opens the conversation
    {"prompt": [turns], "chosen": [turn], "rejected": [turn]}      TRL's conversational form: the
                                                                   prompt's messages, then each
                                                                   reply as one assistant message
                                                                   (or as a string)
    {"chosen": [turns], "rejected": [turns]}                       two whole conversations, the
                                                                   same up to their last turn,
                                                                   the assistant's reply

A turn is {"role": "system" | "user" | "assistant", "content": "..."}. Every form becomes the same
`PreferencePair` (the prompt's turns and the two replies), so the same pair gives the same batch
whichever way a file writes it. A bad record is skipped with a `file:line: reason` warning, like
every other data file's.

Encoding renders prompt + reply with the tokenizer's chat template (`Tokenizer.render_chat`),
once for each reply. The tokens scored are the reply's: the last stretch the template marks as
the assistant's (its content and end-of-turn token, exactly what chat fine-tuning learns), so a
multi-turn prompt's earlier assistant turns are context, not scored. A pair longer than
block_size + 1 tokens is cut at the end (counted as truncated); one left with no reply token is
dropped (counted).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from minigpt.chat_template import CHAT_ROLES
from minigpt.data import RecordBatches, rounded_width
from minigpt.errors import UserInputError
from minigpt.loss import IGNORE_INDEX
from minigpt.sources import (
    WARNINGS_PER_FILE,
    DataReport,
    Document,
    ReadProblem,
    document_hash_fraction,
    read_records,
)
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.data")

# (input ids, targets) of both replies, (pairs, 2, time): [:, 0] the chosen reply, [:, 1] the
# rejected one; targets are IGNORE_INDEX except on the reply's tokens. Then the reference model's
# log-probability of each reply, (pairs, 2).
PreferenceBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class PreferencePair:
    prompt: list[dict]  # the turns before the reply (the last one a user turn, usually)
    chosen: str
    rejected: str
    where: str  # "file:line", for messages

    def conversation(self, reply: str) -> list[dict]:
        return [*self.prompt, {"role": "assistant", "content": reply}]


def _turns_problem(turns: Any, name: str) -> str | None:
    """Why `turns` is not a list of chat turns (None when it is)."""
    if not isinstance(turns, list) or not turns:
        return f"'{name}' must be a string or a non-empty list of messages"
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or turn.get("role") not in CHAT_ROLES or not isinstance(turn.get("content"), str):
            return f"'{name}' message {number} must be an object with 'role' ({', '.join(CHAT_ROLES)}) and string 'content'"
    return None


def _reply(value: Any, name: str) -> str | ReadProblem:
    """A reply given as a string or as a list of one assistant message."""
    if isinstance(value, str):
        return value if value.strip() else ReadProblem(f"'{name}' is empty")
    problem = _turns_problem(value, name)
    if problem:
        return ReadProblem(problem)
    if len(value) != 1 or value[0]["role"] != "assistant":
        return ReadProblem(f"'{name}' must be one assistant message after the prompt, got {len(value)} message(s) "
                           f"starting with a '{value[0]['role']}' turn")
    return value[0]["content"] if value[0]["content"].strip() else ReadProblem(f"'{name}' is empty")


def parse_preference(record: Any, where: str) -> PreferencePair | ReadProblem:
    """A PreferencePair from a record in any of the three forms, or the reason it is bad."""
    if not isinstance(record, dict):
        return ReadProblem("not a JSON object")
    missing = [name for name in ("chosen", "rejected") if name not in record]
    if missing:
        return ReadProblem(f"no '{missing[0]}' field (a preference record has 'chosen' and 'rejected', and a 'prompt' "
                           "unless both are whole conversations)")
    if "prompt" not in record:
        return _parse_conversations(record, where)
    prompt, system = record["prompt"], record.get("system")
    if system is not None and not isinstance(system, str):
        return ReadProblem("'system' must be a string")
    if isinstance(prompt, str):
        if not prompt.strip():
            return ReadProblem("'prompt' is empty")
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    else:
        problem = _turns_problem(prompt, "prompt")
        if problem:
            return ReadProblem(problem)
        if system:
            return ReadProblem("'system' goes with a string prompt; a prompt of messages opens with its own system message")
        turns = prompt
    chosen, rejected = _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected")
    for reply in (chosen, rejected):
        if isinstance(reply, ReadProblem):
            return reply
    return PreferencePair(turns, chosen, rejected, where)


def _parse_conversations(record: dict, where: str) -> PreferencePair | ReadProblem:
    """{"chosen": [turns], "rejected": [turns]}: the same turns, then a different assistant reply."""
    chosen, rejected = record["chosen"], record["rejected"]
    for value, name in ((chosen, "chosen"), (rejected, "rejected")):
        if isinstance(value, str):
            return ReadProblem(f"'{name}' is a string, so the record needs a 'prompt' (or give both as whole conversations)")
        problem = _turns_problem(value, name)
        if problem:
            return ReadProblem(problem)
        if value[-1]["role"] != "assistant":
            return ReadProblem(f"'{name}' must end with the assistant's reply, not a '{value[-1]['role']}' turn")
    if len(chosen) != len(rejected):
        return ReadProblem(f"'chosen' has {len(chosen)} turns and 'rejected' {len(rejected)}: they must share every turn "
                           "before the last assistant reply")
    for number, (first, second) in enumerate(zip(chosen[:-1], rejected[:-1]), start=1):
        if (first["role"], first["content"]) != (second["role"], second["content"]):
            return ReadProblem(f"'chosen' and 'rejected' differ at turn {number}, before the last assistant reply; "
                               "only that reply may differ")
    if len(chosen) < 2:
        return ReadProblem("'chosen' and 'rejected' hold only the reply: add the prompt's turns before it")
    replies = [_reply(value[-1:], name) for value, name in ((chosen, "chosen"), (rejected, "rejected"))]
    for reply in replies:
        if isinstance(reply, ReadProblem):
            return reply
    return PreferencePair([{"role": turn["role"], "content": turn["content"]} for turn in chosen[:-1]], *replies, where)


def read_preference_pairs(sources: Sequence[Path | str], report: DataReport | None = None) -> list[PreferencePair]:
    """Every good pair of the .jsonl/.json sources, in order; bad records are skipped with a
    `file:line: reason` warning, a file with none is refused."""
    return read_records(sources, parse_preference, "preference",
                        "'chosen' and 'rejected' replies (with a 'prompt', or as two whole conversations)", report)


def holdout_split(pairs: Sequence[PreferencePair], val_fraction: float) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, validation): a pair is held out when the stable hash of its prompt falls below
    `val_fraction`, so every pair of one prompt lands on the same side, on every run and machine."""
    train, validation = [], []
    for pair in pairs:
        (validation if document_hash_fraction(Document(conversations=pair.prompt)) < val_fraction else train).append(pair)
    return train, validation


@dataclass
class EncodedReply:
    ids: np.ndarray  # the rendered prompt + reply, int64
    scored: np.ndarray  # bool, as long as ids: True on the reply's tokens (scored as targets)


@dataclass
class EncodedPairs:
    """The pairs as token ids, ready to batch, and the reference log-probabilities once known."""

    chosen: list[EncodedReply]
    rejected: list[EncodedReply]
    where: list[str]
    prompts: list[list[dict]]  # each pair's prompt turns, as read
    report: DataReport = field(default_factory=DataReport)
    # (pairs, 2) float32: log pi_ref of the chosen and rejected reply; NaN until computed (a loss
    # computed without them is NaN, never a wrong number)
    reference: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.float32))

    def __len__(self) -> int:
        return len(self.chosen)

    def fingerprint(self) -> str:
        """A hash of every token id and scored position: the data the reference log-probabilities belong to."""
        digest = hashlib.sha256()
        for reply in (*self.chosen, *self.rejected):
            digest.update(reply.ids.tobytes())
            digest.update(np.packbits(reply.scored).tobytes())
        return digest.hexdigest()[:16]


def last_reply_mask(assistant: Sequence[bool]) -> np.ndarray:
    """True on the last unbroken stretch of True in `assistant`: the final reply of a conversation."""
    mask = np.asarray(assistant, dtype=bool)
    positions = np.flatnonzero(mask)
    scored = np.zeros_like(mask)
    if len(positions):
        end = positions[-1] + 1
        gaps = np.flatnonzero(~mask[:end])
        scored[(gaps[-1] + 1 if len(gaps) else 0) : end] = True
    return scored


def encode_reply(pair: PreferencePair, reply: str, tokenizer: Tokenizer, block_size: int) -> tuple[EncodedReply, bool]:
    """The rendered conversation cut to block_size + 1 tokens, and whether it was cut."""
    ids, assistant = tokenizer.render_chat(pair.conversation(reply))
    cut = len(ids) > block_size + 1
    return EncodedReply(np.asarray(ids[: block_size + 1], dtype=np.int64), last_reply_mask(assistant)[: block_size + 1]), cut


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer: Tokenizer, block_size: int, report: DataReport | None = None) -> EncodedPairs:
    """Render and tokenize both replies of each pair; a pair whose reply is cut away entirely by
    block_size is dropped with a warning (its `file:line`)."""
    report = report if report is not None else DataReport(documents=len(pairs))
    encoded = EncodedPairs([], [], [], [], report)
    for pair in pairs:
        chosen, chosen_cut = encode_reply(pair, pair.chosen, tokenizer, block_size)
        rejected, rejected_cut = encode_reply(pair, pair.rejected, tokenizer, block_size)
        # The first token is never a target (nothing predicts it): a reply must keep a scored token after it.
        if not (chosen.scored[1:].any() and rejected.scored[1:].any()):
            report.dropped += 1
            if report.dropped <= WARNINGS_PER_FILE:
                log.warning("Dropping %s: the prompt fills block_size (%d tokens), leaving no reply to score; raise "
                            "--block-size or shorten the prompt.", pair.where, block_size)
            continue
        report.truncated += chosen_cut or rejected_cut
        encoded.chosen.append(chosen)
        encoded.rejected.append(rejected)
        encoded.where.append(pair.where)
        encoded.prompts.append(pair.prompt)
    if not encoded.chosen:
        raise UserInputError(f"No preference pair fits block_size {block_size} with its reply: raise --block-size.")
    encoded.reference = np.full((len(encoded), 2), np.nan, dtype=np.float32)
    return encoded


def inputs_and_targets(reply: EncodedReply, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Input ids and next-token targets of a reply, padded on the right to `width` columns;
    targets are IGNORE_INDEX except on the reply's own tokens."""
    inputs = np.full(width, pad_id, dtype=np.int64)
    targets = np.full(width, IGNORE_INDEX, dtype=np.int64)
    length = len(reply.ids) - 1
    inputs[:length] = reply.ids[:-1]
    targets[:length] = np.where(reply.scored[1:], reply.ids[1:], IGNORE_INDEX)
    return inputs, targets


class PreferenceBatches(RecordBatches):
    """Batches of pairs, `PreferenceBatch`: both replies of a pair sit in one batch row (the
    second dimension), so cutting a batch into micro-batches never separates a pair. Each batch
    is padded to its longest reply rounded up to data.ROW_WIDTH_STEP (a few batch shapes, not one
    per batch). The reference log-probabilities (`EncodedPairs.reference`) are set before training
    by the DPO stage."""

    def __init__(self, encoded: EncodedPairs, batch_size: int, pad_id: int, *, loop: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__(len(encoded), batch_size, loop=loop, seed=seed, rank=rank, world_size=world_size)
        self.encoded, self.pad_id = encoded, pad_id
        self.report = encoded.report
        self.longest = max(len(reply.ids) - 1 for reply in (*encoded.chosen, *encoded.rejected))

    def replies(self, chosen: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The input ids and targets of the chosen pairs' replies, (pairs, 2, width)."""
        replies = [(self.encoded.chosen[index], self.encoded.rejected[index]) for index in chosen]
        width = rounded_width(max(len(reply.ids) - 1 for pair in replies for reply in pair), self.longest)
        rows = [[inputs_and_targets(reply, width, self.pad_id) for reply in pair] for pair in replies]
        return (torch.from_numpy(np.array([[row[0] for row in pair] for pair in rows])),
                torch.from_numpy(np.array([[row[1] for row in pair] for pair in rows])))

    def _batch(self, chosen: np.ndarray) -> PreferenceBatch:
        return *self.replies(chosen), torch.from_numpy(self.encoded.reference[chosen])

