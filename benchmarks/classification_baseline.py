#!/usr/bin/env python3
"""MiniGPT's from-scratch classifier against a classic baseline, on the built-in labelled set.

    baseline  TF-IDF of character 1-3-grams + logistic regression (scikit-learn: pip install -e ".[bench]"),
              once with scikit-learn's defaults and once tuned on this set
    MiniGPT   `train-classifier` with its default CPU recipe (--max-time bounds it, 600 s by default)

Both train on the same fixed training split and are scored on the same validation split by
macro-F1 (each of the five groups counts the same). Neither looks at the validation split while
training: MiniGPT trains on the whole training split for the recipe's steps (or until --max-time)
and its last model is scored, so no checkpoint is picked by the very texts it is scored on
(`train-classifier` on the built-in set would pick its best evaluation on them). Prints both
scores, MiniGPT's steps, tokens and tokens/s, and the wall time of each.

The recipe's settings were chosen on the fixed validation split, which flatters it there. With
--fresh-splits N the same texts are also split N more ways (by a hash of the split's number and
the text, the same fraction to validation), never seen while the recipe was tuned, and all three
are scored again on each; the means close the run.

    python benchmarks/classification_baseline.py [--max-time 600] [--output-dir /tmp/bench] [--fresh-splits 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
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
from minigpt.labelled_corpus import VALIDATION_FRACTION, builtin_labelled_files, builtin_labelled_records  # noqa: E402
from minigpt.labelled_data import encode_records, read_labelled_records  # noqa: E402
from minigpt.model_folder import load_classifier  # noqa: E402
from minigpt.sources import Document, document_hash_fraction  # noqa: E402


def baseline(train: list, validation: list, tuned: bool = True) -> tuple[float, float]:
    """(macro-F1, seconds) of TF-IDF character 1-3-grams + logistic regression: tuned (n-grams
    within words, sublinear counts, grams seen twice, weak regularisation) or scikit-learn's defaults."""
    start = time.perf_counter()
    if tuned:
        vectorizer, classifier = (TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2),
                                  LogisticRegression(max_iter=2000, C=10.0))
    else:
        vectorizer, classifier = TfidfVectorizer(analyzer="char", ngram_range=(1, 3)), LogisticRegression(max_iter=2000)
    features = vectorizer.fit_transform([record.text for record in train])
    classifier.fit(features, [record.labels["labels"] for record in train])
    predicted = classifier.predict(vectorizer.transform([record.text for record in validation]))
    score = f1_score([record.labels["labels"] for record in validation], predicted, average="macro")
    return float(score), time.perf_counter() - start


def fresh_split(number: int, directory: Path) -> tuple[Path, Path]:
    """The built-in set's texts (both sides pooled) split anew into train.jsonl and val.jsonl under
    `directory`: a text goes to validation when the hash of the split's number and the text falls
    below the built-in set's validation fraction."""
    sides: dict[str, list[dict]] = {"train": [], "val": []}
    for record in (record for side in builtin_labelled_records() for record in side):
        fraction = document_hash_fraction(Document(text=f"{number}:{record['text']}"))
        sides["val" if fraction < VALIDATION_FRACTION else "train"].append(record)
    directory.mkdir(parents=True, exist_ok=True)
    for side, records in sides.items():
        (directory / f"{side}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return directory / "train.jsonl", directory / "val.jsonl"


def minigpt(train_file: Path, output_dir: Path, max_time: float, validation: list) -> tuple[float, float, Path, RunConfig]:
    """(macro-F1 of the last model on the validation split, wall seconds, the run directory, its configuration)."""
    start = time.perf_counter()
    status = train_classifier.main(["--data-files", str(train_file), "--val-fraction", "0", "--output-dir", str(output_dir),
                                    "--run-name", "bench", "--max-time", str(max_time)])
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"train-classifier exited with status {status}")
    run = output_dir / "bench"
    loaded = load_classifier(run / "final_model")
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    labels = config.train.label_maps["labels"]
    encoded = encode_records(validation, tokenizer, config.train.label_maps, model.config.block_size)
    predicted = predict(model, encoded, tokenizer.pad_id)["labels"].argmax(-1)
    score = f1_score([record.labels["labels"] for record in validation], [labels[index] for index in predicted], average="macro")
    return float(score), seconds, run, config


def describe_recipe(config: RunConfig) -> str:
    """The recipe as the run recorded it: model shape, tokenizer, block, pooling, auxiliary loss."""
    model, train = config.model, config.train
    return (f"{model.n_layer} layer{'s' if model.n_layer != 1 else ''} x {model.n_embd} wide, {train.tokenizer_type.upper()} vocabulary {model.vocab_size}, "
            f"block {model.block_size}, {train.pooling} pooling, language-model loss x{train.lm_loss_weight:g}, "
            f"batch {train.batch_size}, learning rate {train.learning_rate:g}, {train.dtype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", type=float, default=600.0, help="MiniGPT's training budget in seconds")
    parser.add_argument("--output-dir", type=Path, default=None, help="where MiniGPT's run goes (default: a temporary folder)")
    parser.add_argument("--fresh-splits", type=int, default=0, metavar="N",
                        help="also score all three on N other splits of the same texts, not used to tune the recipe")
    arguments = parser.parse_args()
    if arguments.fresh_splits < 0:
        parser.error("--fresh-splits takes a count of splits, 0 or more")
    output_dir = arguments.output_dir or Path(tempfile.mkdtemp(prefix="classification-bench-"))
    train_file, val_file = builtin_labelled_files(output_dir / "builtin_labelled")
    train, validation = read_labelled_records([train_file]), read_labelled_records([val_file])
    print(f"built-in labelled set: {len(train)} training, {len(validation)} validation records, "
          f"{len(set(record.labels['labels'] for record in train))} classes")
    default_f1, default_seconds = baseline(train, validation, tuned=False)
    print(f"baseline with scikit-learn's defaults (TF-IDF char 1-3-grams + logistic regression): macro-F1 {default_f1:.4f} "
          f"in {default_seconds:.1f} s")
    baseline_f1, baseline_seconds = baseline(train, validation)
    print(f"baseline, tuned (TF-IDF char 1-3-grams within words + logistic regression, C=10): macro-F1 {baseline_f1:.4f} "
          f"in {baseline_seconds:.1f} s")
    minigpt_f1, minigpt_seconds, run, config = minigpt(train_file, output_dir, arguments.max_time, validation)
    summary = json.loads((run / "summary.json").read_text())
    print(f"MiniGPT recipe: {describe_recipe(config)}")
    print(f"MiniGPT from scratch ({summary['steps']} steps, {summary['tokens']:,} tokens, {summary['training_seconds']:.0f} s of "
          f"training at {summary['tokens_per_second']:,.0f} tokens/s, stopped by {summary['stop_reason']}): "
          f"macro-F1 {minigpt_f1:.4f} in {minigpt_seconds:.1f} s wall")
    print(f"difference to the tuned baseline: {minigpt_f1 - baseline_f1:+.4f} macro-F1 "
          f"({'MiniGPT' if minigpt_f1 > baseline_f1 else 'baseline'} ahead); to the default one: {minigpt_f1 - default_f1:+.4f}")
    fresh = []  # (defaults, tuned, MiniGPT) macro-F1 per fresh split
    for number in range(1, arguments.fresh_splits + 1):
        train_file, val_file = fresh_split(number, output_dir / f"split{number}")
        train, validation = read_labelled_records([train_file]), read_labelled_records([val_file])
        scores = (baseline(train, validation, tuned=False)[0], baseline(train, validation)[0],
                  minigpt(train_file, output_dir / f"split{number}", arguments.max_time, validation)[0])
        fresh.append(scores)
        print(f"fresh split {number} ({len(train)} training, {len(validation)} validation records): macro-F1 baseline with "
              f"defaults {scores[0]:.4f}, tuned {scores[1]:.4f}, MiniGPT {scores[2]:.4f}")
    if fresh:
        default_mean, tuned_mean, minigpt_mean = (statistics.mean(column) for column in zip(*fresh))
        print(f"mean over {len(fresh)} fresh splits: baseline with defaults {default_mean:.4f}, tuned {tuned_mean:.4f}, "
              f"MiniGPT {minigpt_mean:.4f} ({minigpt_mean - tuned_mean:+.4f} to the tuned baseline, "
              f"{minigpt_mean - default_mean:+.4f} to the default one)")


if __name__ == "__main__":
    main()
