"""`minigpt classify`: run a trained classifier on texts or on a file of records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minigpt.classification import classify, confusion_matrix, scores_from_confusion, scores_table
from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.errors import UserInputError
from minigpt.files import atomic_write_bytes
from minigpt.labelled_data import LabelledRecord, read_labelled_records
from minigpt.loss import IGNORE_INDEX
from minigpt.model_folder import load_classifier
from minigpt.runtime import select_device
from minigpt.sources import resolve_data_files


def build_parser() -> ArgumentParser:
    prog = program_name("classify")
    parser = ArgumentParser(
        prog=prog, description="Classify texts with a model trained by train-classifier: each task's label and probability.",
        epilog=(f"examples:\n  {prog} checkpoints/RUN/final_model --text \"Return a new socket object.\"\n"
                f"  {prog} checkpoints/RUN/final_model --data-files test.jsonl --output predictions.jsonl"),
    )
    add_shared_arguments(parser, "model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", metavar="TEXT", help="a text to classify (repeatable)")
    add_shared_arguments(source, "data_files")
    add_shared_arguments(parser, "text_field", "device")
    parser.add_argument("--output", metavar="PATH", help="with --data-files: write one JSON line per record, in input order")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="texts per forward pass (default: 32)")
    return parser


def print_metrics(labels: np.ndarray, probabilities: dict[str, np.ndarray], label_maps: dict) -> None:
    """Accuracy, macro-F1 and a per-class table for each task whose labels the file holds."""
    for index, (task, names) in enumerate(label_maps.items()):
        known = labels[:, index] != IGNORE_INDEX
        if not known.any():
            continue
        scores = scores_from_confusion(confusion_matrix(labels[known, index], probabilities[task][known].argmax(-1), len(names)))
        print(f"{task}: {int(known.sum())} labelled records, accuracy {scores['accuracy']:.4f}, macro-F1 {scores['f1_macro']:.4f}")
        print(scores_table(scores, names))


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.output and not arguments.data_files:
        raise UserInputError("--output writes the predictions of --data-files; give the records with --data-files.")
    if arguments.batch_size < 1:
        raise UserInputError(f"--batch-size must be positive, got {arguments.batch_size}.")
    loaded = load_classifier(arguments.model, select_device(arguments.device))
    model, tokenizer, label_maps = loaded.model, loaded.tokenizer, loaded.config.train.label_maps
    if arguments.text:
        records = [LabelledRecord(text, {}, "--text") for text in arguments.text]
    else:
        records = read_labelled_records(resolve_data_files(arguments.data_files, builtin=False), arguments.text_field)
    classified = classify(model, tokenizer, label_maps, records, arguments.batch_size)
    results = classified.predictions
    if arguments.output:
        lines = "".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results)
        atomic_write_bytes(Path(arguments.output), lines.encode("utf-8"))  # all or nothing
        print(f"Wrote {len(results)} predictions to {arguments.output}")
    else:
        for result in results:
            shown = ", ".join(f"{task}: {value['label']} ({value['score']:.3f})" for task, value in result["predictions"].items())
            print(f"{shown}\t{result['text'][:80]!r}" if len(results) > 1 else shown)
    if (classified.labels != IGNORE_INDEX).any():
        print_metrics(classified.labels, classified.probabilities, label_maps)
    return 0
