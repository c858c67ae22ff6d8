"""Preference tuning with DPO: make the chosen reply likelier than the rejected one, relative to a reference.

After chat fine-tuning a model answers; preference tuning teaches it which of two answers is
better. Each record is a prompt with a chosen and a rejected reply (`minigpt.preference_data`);
the loss is DPO's (`minigpt.objective.Preference`):

    -log sigmoid(beta * [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])

with each log-probability summed over the reply's tokens (its content and end-of-turn token).

The reference pi_ref is the model the run starts from (--init-from: a chat model, or a base with
the adapter the run starts from), or --ref-model. Its log-probabilities never change, so they are
computed once, before the first step, in one pass over the training and validation pairs, and
stored with the run (reference_logprobs.safetensors): no second model is held in memory while
training, and --resume reads them back, so a resumed run computes exactly what the uninterrupted
one did. With LoRA, the pass runs on the base with the fresh adapters, which compute nothing yet
(their B matrices start at zero): the same numbers as the base alone.

Dropout is off (model.dropout and lora_dropout are set to 0): with it on, the model at step 0
would not compute what the reference computed, and the first loss would not be ln 2. With no
data given, it trains on the built-in preference set (`minigpt.preference_corpus`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from minigpt.config import RunConfig, apply_overrides
from minigpt.distributed import is_main_process, process_place
from minigpt.errors import UserInputError
from minigpt.files import atomic_write_bytes
from minigpt.metrics import read_metrics
from minigpt.model_folder import load_language_model
from minigpt.objective import Objective, Preference, reply_log_probs
from minigpt.plots import preference_curves_figure, save_png
from minigpt.preference_corpus import builtin_preference_files
from minigpt.preference_data import EncodedPairs, PreferenceBatches, encode_pairs, holdout_split, read_preference_pairs
from minigpt.runtime import autocast
from minigpt.sources import DataReport, resolve_data_files
from minigpt.stages.base import Stage
from minigpt.tokenizer import Tokenizer
from minigpt.trainer import Callback, Trainer

log = logging.getLogger("minigpt.run")

REFERENCE_FILE = "reference_logprobs.safetensors"

# Starting from a chat model: a learning rate far below fine-tuning's (the loss's gradient grows
# with how sure the model already is, and a small model's replies degrade fast), a short warmup,
# frequent evaluations of the validation preference accuracy, and the best of them kept.
RECIPE = {
    "train.learning_rate": 1e-4, "train.min_lr_ratio": 0.1, "train.warmup_steps": 10, "train.weight_decay": 0.0,
    "train.batch_size": 8, "train.max_steps": 300, "train.eval_steps": 25, "train.eval_batches": 50, "train.save_steps": 100,
    "train.keep_checkpoints": 2, "train.log_steps": 5, "train.val_fraction": 0.05,
}
RECIPE_NAME = "the DPO recipe"


class DPOStage(Stage):
    name = "dpo"
    help = "preference tuning (DPO): the chosen reply made likelier than the rejected one, relative to the starting model"
    settings = frozenset({"dpo_beta", "rpo_alpha", "ref_model"})
    chat = True
    reads_builtin_text = False  # preference pairs, which no built-in text set holds
    epochs_cost_nothing = True  # the pairs are in memory

    def default_config(self, starting_from_model: bool) -> RunConfig:
        return apply_overrides(RunConfig(), {**RECIPE, "train.stage": self.name}, source=RECIPE_NAME)

    def check(self, config: RunConfig) -> None:
        train = config.train
        if not (train.init_from or train.tokenizer_path or train.resume):
            raise UserInputError("Preference tuning starts from a chat model: give it with --init-from (a run from scratch "
                                 "needs a --tokenizer, since preference records hold no text to train one on).")

    def starting_from_scratch(self) -> None:
        log.warning("Preference tuning a model from scratch: its reference is random, and it knows no language to prefer "
                    "one reply in. Start from a chat model with --init-from.")

    def builtin_sources(self, config: RunConfig) -> tuple[RunConfig, list]:
        """The built-in preference set, written once under the output directory; config.json then names its files."""
        train_file, val_file = builtin_preference_files(Path(config.train.output_dir) / "builtin_preferences")
        train = dataclasses.replace(config.train, data_files=[str(train_file)], val_data_files=config.train.val_data_files or [str(val_file)])
        return dataclasses.replace(config, train=train), [train_file]

    def prepare_data(self, config: RunConfig, sources: list, tokenizer: Tokenizer, device: torch.device,
                     resumed: bool) -> tuple[RunConfig, PreferenceBatches, PreferenceBatches | None]:
        config = dropout_off(config)
        train = config.train
        report = DataReport()
        pairs = read_preference_pairs(sources, report)
        val_files = resolve_data_files(train.val_data_files, builtin=False) if train.val_data_files else []
        val_pairs = read_preference_pairs(val_files) if val_files else []
        if not val_files and train.val_fraction > 0:
            pairs, val_pairs = holdout_split(pairs, train.val_fraction)
            report.documents = len(pairs)
        if not pairs:
            raise UserInputError("Every preference pair was held out for validation; lower --val-fraction or add data.")
        block_size, pad = config.model.block_size, tokenizer.pad_id
        encoded = encode_pairs(pairs, tokenizer, block_size, report)
        place = process_place()  # under torchrun each process trains on its share of every round of batches
        train_stream = PreferenceBatches(encoded, train.batch_size, pad, loop=True, seed=train.seed, rank=place.rank,
                                         world_size=place.world_size)
        val_stream = PreferenceBatches(encode_pairs(val_pairs, tokenizer, block_size), train.batch_size, pad, loop=False) if val_pairs else None
        log.info("Preference pairs: %d for training, %d for validation; %d cut to %d tokens, %d dropped", len(encoded),
                 len(val_stream.encoded) if val_stream else 0, report.truncated, block_size + 1, report.dropped)
        return config, train_stream, val_stream

    def build_objective(self, config: RunConfig, tokenizer: Tokenizer, train_stream: Any) -> Objective:
        return Preference(config.train.dpo_beta, config.train.rpo_alpha, tokenizer.vocab_size)

    def before_training(self, trainer: Trainer, resumed: bool) -> None:
        """The reference log-probabilities of every training and validation pair: read back from
        the run on --resume, else computed now and written there."""
        streams = {"train": trainer.train_batches, "val": trainer.val_batches}
        encoded = {split: stream.encoded for split, stream in streams.items() if stream is not None}
        path = trainer.run_dir / REFERENCE_FILE
        if resumed:
            for split, values in read_reference(path, encoded).items():
                encoded[split].reference = values
            log.info("Reference log-probabilities read from %s", path)
            return
        started = time.perf_counter()
        reference_path = trainer.train_config.ref_model
        if reference_path:
            loaded = load_language_model(reference_path, trainer.device)
            check_reference_model(reference_path, loaded.tokenizer, trainer.tokenizer, loaded.config.model.block_size, streams["train"])
            model, source = loaded.model, reference_path
        else:
            model, source = trainer.model, trainer.train_config.init_from or "the model at step 0"
        for split, stream in streams.items():
            if stream is not None:
                stream.encoded.reference = reference_log_probs(model, stream, trainer.device, trainer.dtype)
        if is_main_process():
            write_reference(path, encoded)
        log.info("Reference log-probabilities of %s pairs from %s in %.1f s, stored in %s", f"{sum(map(len, encoded.values())):,}",
                 source, time.perf_counter() - started, path)

    def callbacks(self, config: RunConfig) -> list[Callback]:
        return [PreferencePlotCallback()] if config.train.plot_loss else []

    def next_steps(self, final_model: Path) -> list[tuple[str, str]]:
        return [("Chat with it", f"chat {final_model}")]


class PreferencePlotCallback(Callback):
    """--plot-loss: beside the loss curve, plots/preference_curves_latest.png (the DPO loss, rewards and margin,
    preference accuracy, the replies' log-probabilities) at every checkpoint and at the end."""

    def _plot(self, trainer: Trainer) -> None:
        try:
            figure = preference_curves_figure(read_metrics(trainer.run_dir / "metrics.jsonl"), title=trainer.run_dir.name)
            save_png(figure, trainer.run_dir / "plots" / "preference_curves_latest.png")
        except Exception as error:  # noqa: BLE001 - a plot must never stop training
            log.warning("Could not draw the preference curves: %s", error)

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        self._plot(trainer)

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self._plot(trainer)


def dropout_off(config: RunConfig) -> RunConfig:
    """The configuration with model.dropout and lora_dropout at 0 (said in the log when they were not)."""
    if not (config.model.dropout or config.train.lora_dropout):
        return config
    log.info("DPO computes its log-probabilities with dropout off: model.dropout %g and lora_dropout %g set to 0 "
             "(with dropout the model at step 0 would differ from its reference).", config.model.dropout, config.train.lora_dropout)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, dropout=0.0),
                               train=dataclasses.replace(config.train, lora_dropout=0.0))


@torch.no_grad()
def reference_log_probs(model: torch.nn.Module, stream: PreferenceBatches, device: torch.device, dtype: torch.dtype) -> np.ndarray:
    """log pi(reply | prompt) of both replies of every pair of `stream`, in order, (pairs, 2) float32:
    the model in eval mode (no dropout), in batches of the stream's size, computing as training does."""
    was_training = model.training
    model.eval()
    count, size = len(stream.encoded), stream.batch_size
    values = []
    for start in range(0, count, size):
        inputs, targets = stream.replies(np.arange(start, min(start + size, count)))
        with autocast(device, dtype):
            values.append(reply_log_probs(model, inputs.to(device), targets.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(values).numpy()


def write_reference(path: Path, encoded: dict[str, EncodedPairs]) -> None:
    """The reference log-probabilities of each split, with the fingerprint of the pairs they belong to."""
    tensors = {split: torch.from_numpy(pairs.reference) for split, pairs in encoded.items()}
    metadata = {f"{split}_fingerprint": pairs.fingerprint() for split, pairs in encoded.items()}
    atomic_write_bytes(path, save_safetensors(tensors, metadata=metadata))


def read_reference(path: Path, encoded: dict[str, EncodedPairs]) -> dict[str, np.ndarray]:
    """What `write_reference` stored, refused in one sentence if it is missing or belongs to other data."""
    if not path.is_file():
        raise UserInputError(f"{path} is missing: this DPO run's reference log-probabilities are stored there; restore it "
                             "or start a new run.")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (OSError, SafetensorError):
        raise UserInputError(f"{path} is damaged; restore it or start a new run.") from None
    for split, pairs in encoded.items():
        if split not in tensors or metadata.get(f"{split}_fingerprint") != pairs.fingerprint():
            raise UserInputError(f"The {split} preference pairs differ from those {path} was computed on (the data files or "
                                 "the tokenizer changed since the run started); restore them or start a new run.")
    return {split: tensors[split].numpy() for split in encoded}


def check_reference_model(path: str, reference: Tokenizer, tokenizer: Tokenizer, block_size: int, stream: PreferenceBatches) -> None:
    """Refuse a --ref-model whose tokens mean something else, or whose window is too short for the pairs."""
    sample = stream.encoded.chosen[0].ids.tolist()
    if reference.vocab_size != tokenizer.vocab_size or reference.encode(tokenizer.decode(sample)) != tokenizer.encode(tokenizer.decode(sample)):
        raise UserInputError(f"--ref-model {path} has another tokenizer than the model being trained; the reference must share "
                             "its tokens (a model fine-tuned from the same base).")
    if block_size < stream.longest:
        raise UserInputError(f"--ref-model {path} reads at most {block_size} tokens, and the pairs need {stream.longest}; "
                             "choose a reference with a longer window or lower --block-size.")
