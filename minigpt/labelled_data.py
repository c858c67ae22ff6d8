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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from minigpt.data import EpochState, rounded_width
from minigpt.errors import UserInputError
from minigpt.loss import IGNORE_INDEX
from minigpt.sources import DataReport, Document, document_hash_fraction, jsonl_items, read_json_array
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.data")

LABELS_SUFFIX = "_labels"  # "<task>_labels" holds the label of task <task>
SINGLE_TASK_FIELD = "labels"  # a lone "labels" field: one task, named "labels"
WARNINGS_PER_FILE = 10

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


def _parse(record: Any, text_field: str) -> LabelledRecord | str:
    """A LabelledRecord (where filled in later), or the reason the record is bad."""
    if not isinstance(record, dict):
        return "not a JSON object"
    text = record.get(text_field)
    if not isinstance(text, str) or not text.strip():
        return f"no text in field '{text_field}'"
    labels = {}
    for name, value in record.items():
        task = task_of_field(name)
        if task is None or value is None:  # null: the label is missing, like an absent field
            continue
        problem = label_problem(value)
        if problem:
            return f"field '{name}': {problem}"
        labels[task] = value
    return LabelledRecord(text, labels, "")


def read_labelled_records(sources: Sequence[Path | str], text_field: str = "text",
                          report: DataReport | None = None) -> list[LabelledRecord]:
    """Every good record of the .jsonl/.json sources, in order; bad ones are skipped with a
    `file:line: reason` warning (a .json array: `file:item N`), a file with none refused."""
    report = report if report is not None else DataReport()
    records: list[LabelledRecord] = []
    for source in sources:
        path = Path(source)
        if path.suffix not in (".jsonl", ".json"):
            raise UserInputError(f"Classification data must be .jsonl or .json records with labels; {path} is neither.")
        if path.suffix == ".json":
            items = [(f"{path}:item {number}", record) for number, record in enumerate(read_json_array(path), start=1)]
        else:
            items = list(jsonl_items(path))
        bad, good_before = 0, len(records)
        for where, item in items:
            parsed = item if isinstance(item, str) else _parse(item, text_field)
            if isinstance(parsed, str):
                bad += 1
                report.bad_lines += 1
                if bad <= WARNINGS_PER_FILE:
                    log.warning("Skipping %s: %s", where, parsed)
                continue
            parsed.where = where
            records.append(parsed)
        if len(records) == good_before:
            raise UserInputError(f"{path} holds no usable labelled records; each needs a '{text_field}' string and label fields.")
    report.documents += len(records)
    return records


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
    """Tokenize the texts (cut to block_size tokens; counted as truncated) and number the labels.

    A label the map does not know (not seen in the training data) is reported with its record's
    `file:line` and ignored."""
    report = report if report is not None else DataReport(documents=len(records))
    ids = []
    for tokens in tokenizer.encode_batch([record.text for record in records]):
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


class ClassificationBatches:
    """Batches of (input ids, lengths, labels) from encoded records.

    loop=True (training): shuffled anew each epoch (the order is drawn from `seed` and the epoch
    number, so the position is just two integers) and never ends. loop=False (evaluation): in
    order, once, starting over each time it is iterated.

    Under torchrun (`rank` of `world_size`) every process holds all the records (the label maps
    and class weights are counted over all of them) and trains on its share: the epoch's order is
    cut in batches, the last one shorter, and the processes take them in turn, each its own
    batch of every `world_size` in a row. So 2 processes with one batch each see exactly the
    records that 1 process sees in 2 accumulated batches. The position is where the next round of
    `world_size` batches starts, the same in every process.
    """

    one_document_per_row = True  # for the trainer's data report: truncation is counted

    def __init__(self, encoded: EncodedRecords, batch_size: int, pad_id: int, *, loop: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not encoded.ids:
            raise UserInputError("No labelled records are left to train on.")
        self.encoded, self.batch_size, self.pad_id = encoded, batch_size, pad_id
        self.loop, self.seed = loop, seed
        self.rank, self.world_size = rank, world_size
        self.report = encoded.report
        self.epoch = EpochState()  # position: records of this pass's order already batched
        self.longest = max(len(ids) for ids in encoded.ids)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = EpochState.from_saved(state["epoch"], state.get("position", 0))
        if self.epoch.position >= len(self.encoded.ids):  # saved at the very end of an epoch
            self.epoch = replace(self.epoch, passes=self.epoch.passes + 1, position=0)

    def sequences_per_pass(self) -> int:
        return len(self.encoded.ids)

    def _order(self, epoch: int) -> np.ndarray:
        count = len(self.encoded.ids)
        return np.random.default_rng([self.seed, epoch]).permutation(count) if self.loop else np.arange(count)

    def __iter__(self) -> Iterator[ClassificationBatch]:
        if self.loop:
            return self._endless()
        return (self._batch(np.arange(start, min(start + self.batch_size, len(self.encoded.ids))))
                for start in range(0, len(self.encoded.ids), self.batch_size))

    def _after_batch(self, epoch: EpochState) -> EpochState:
        """Where the batch after the one starting at `epoch` starts: a pass's last batch is shorter."""
        position = epoch.position + self.batch_size
        if position >= len(self.encoded.ids):
            return replace(epoch, passes=epoch.passes + 1, position=0)
        return replace(epoch, position=position)

    def _endless(self) -> Iterator[ClassificationBatch]:
        while True:
            start = self.epoch
            for _ in range(self.rank):  # the batches of the processes before this one
                start = self._after_batch(start)
            chosen = self._order(start.passes)[start.position : start.position + self.batch_size]
            for _ in range(self.world_size):  # the round: this process's batch and the others'
                self.epoch = self._after_batch(self.epoch)
            yield self._batch(chosen)

    def _batch(self, chosen: np.ndarray) -> ClassificationBatch:
        """The chosen records, padded to their longest rounded up to data.ROW_WIDTH_STEP (never past the
        longest record): a few batch shapes, not one per batch. On a CPU, oneDNN keeps a compiled
        kernel per shape under bfloat16, and a compiled model compiles once per shape."""
        sequences = [self.encoded.ids[index] for index in chosen]
        ids, lengths = pad_batch(sequences, self.pad_id, rounded_width(max(map(len, sequences)), self.longest))
        return ids, lengths, torch.from_numpy(self.encoded.labels[chosen])
