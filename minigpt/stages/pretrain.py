"""Pretraining: next-token prediction on every token of plain text.

Documents are tokenized, joined with an end-of-text token between them and cut into blocks of
block_size + 1 tokens (`minigpt.data.TokenBlockStream`); the model learns to predict each token
from the ones before it. With no data given, it trains on Python's own documentation
(`minigpt.corpus`), which every Python installation carries.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from minigpt.config import RunConfig
from minigpt.corpus import BUILTIN_CORPUS
from minigpt.data import ParallelBatches, RepeatedBatch, TokenBlockStream, holdout_filling_one_block
from minigpt.distributed import main_process_first, process_place
from minigpt.errors import UserInputError
from minigpt.objective import LanguageModelObjective, Objective
from minigpt.runtime import available_cpu_cores
from minigpt.sources import resolve_data_files
from minigpt.stages.base import Stage
from minigpt.token_cache import build_token_cache
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.run")

# The settings of the token-block stream and of the sample drawn at evaluations: they apply to
# the stages that train a language model on token blocks (pretrain, sft), not to classification.
LANGUAGE_MODEL_SETTINGS = frozenset({"token_cache", "shuffle_buffer", "max_data_size", "overfit_batch", "dataloader_workers",
                                     "sample_tokens"})


def dataloader_workers(requested: int, device: torch.device) -> int:
    """-1 (auto): on a CUDA GPU, up to 4 processes so tokenizing never holds the GPU up; on a CPU or
    MPS, none: the model needs the cores, and tokenizing is a small share of a step there."""
    if requested >= 0:
        return requested
    return min(4, max(1, available_cpu_cores() // 2)) if device.type == "cuda" else 0


class PretrainStage(Stage):
    name = "pretrain"
    help = "next token on every token of plain text"
    settings = LANGUAGE_MODEL_SETTINGS

    def builtin_sources(self, config: RunConfig) -> tuple[RunConfig, list]:
        return config, [BUILTIN_CORPUS]

    def prepare_data(self, config: RunConfig, sources: list, tokenizer: Tokenizer, device: torch.device,
                     resumed: bool) -> tuple[RunConfig, object, TokenBlockStream | None]:
        if not resumed:  # a resumed run keeps the split and the reader count its config.json recorded
            config = self.resolve_validation(config, sources, tokenizer)
            # The batch order depends on the number of data-loader workers: record what -1 (auto)
            # means on this device, so a resumed run, on whatever device, reads with the same number.
            workers = dataloader_workers(config.train.dataloader_workers, device)
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, dataloader_workers=workers))
        return (config, *self.build_streams(config, sources, tokenizer, device))

    def block_stream_options(self, config: RunConfig) -> dict[str, bool]:
        """How documents become rows: run on into each other (pretraining), or whole
        conversations with only the assistant's tokens as targets (chat fine-tuning overrides this)."""
        return dict(assistant_only_loss=False, one_document_per_row=False)

    def resolve_validation(self, config: RunConfig, sources: list, tokenizer: Tokenizer) -> RunConfig:
        """The configuration with a hold-out that works for this data.

        A small file's 1% hold-out may not fill one block. Then enough whole documents are held out
        to fill one, if the rest still fills a training block; if the data is too small for both,
        the run trains without validation (val_fraction 0: no evaluations, so no early stopping).
        Either way it is said in one line, and written to config.json so a resume reads the same split.
        """
        train = config.train
        if train.val_data_files or train.val_fraction == 0:
            return config
        held_out = TokenBlockStream(sources, tokenizer, config.model.block_size, 1, split="val", val_fraction=train.val_fraction,
                                    loop=False, text_field=train.text_field, **self.block_stream_options(config))
        try:
            held_out.check_not_empty()
            return config
        except UserInputError:
            pass
        fraction = holdout_filling_one_block(sources, tokenizer, config.model.block_size, train.val_fraction, train.text_field)
        block = f"one block of {config.model.block_size + 1} tokens"
        if fraction is None:
            stopping = " and early stopping is off" if train.early_stopping_patience else ""
            log.warning("The data is too small to hold out %s for validation and still train on another: training without "
                        "validation (no evaluations%s). Add data or pass --val-data-files.", block, stopping)
            fraction = 0.0
        else:
            log.info("A %.1f%% hold-out does not fill %s: holding out %.1f%% of the documents for validation instead.",
                     100 * train.val_fraction, block, 100 * fraction)
        return dataclasses.replace(config, train=dataclasses.replace(train, val_fraction=fraction))

    def build_streams(
        self, config: RunConfig, sources: list, tokenizer: Tokenizer, device: torch.device
    ) -> tuple[TokenBlockStream | RepeatedBatch | ParallelBatches, TokenBlockStream | None]:
        """The endless, shuffled training stream (or its first batch, repeated) and the finite
        validation stream (None with val_fraction 0 and no validation files: no evaluations).

        Under torchrun every process reads the whole training stream and keeps its batch of each
        round of world_size batches (`TokenBlockStream.__next__`); the validation stream is read whole by every process, and
        evaluation splits its batches (see `minigpt.evaluation`). With train.dataloader_workers above
        0, that many worker processes read the training stream."""
        train = config.train
        place = process_place()
        shard = dict(rank=place.rank, world_size=place.world_size)
        common = dict(tokenizer=tokenizer, block_size=config.model.block_size, batch_size=train.batch_size, text_field=train.text_field,
                      **self.block_stream_options(config))
        val_sources = resolve_data_files(train.val_data_files) if train.val_data_files else []
        if train.token_cache:
            cache_root = Path(train.output_dir) / "token_cache"
            with main_process_first():  # rank 0 builds the cache, the others then find it
                sources = [build_token_cache(sources, tokenizer, cache_root, train.text_field)]
                val_sources = [build_token_cache(val_sources, tokenizer, cache_root, train.text_field)] if val_sources else []
        if val_sources or train.val_fraction == 0:
            train_stream = TokenBlockStream(sources, split="all", shuffle_buffer=train.shuffle_buffer, seed=train.seed,
                                            max_documents=train.max_data_size, **shard, **common)
            val_stream = TokenBlockStream(val_sources, split="all", loop=False, **common) if val_sources else None
        else:
            train_stream = TokenBlockStream(sources, split="train", val_fraction=train.val_fraction, shuffle_buffer=train.shuffle_buffer,
                                            seed=train.seed, max_documents=train.max_data_size, **shard, **common)
            val_stream = TokenBlockStream(sources, split="val", val_fraction=train.val_fraction, loop=False, **common)
        train_stream.check_not_empty()
        if val_stream is not None:
            val_stream.check_not_empty()
        if train.overfit_batch:
            return RepeatedBatch(train_stream), val_stream
        if train.dataloader_workers > 0:
            return ParallelBatches(train_stream, train.dataloader_workers, pin_memory=device.type == "cuda"), val_stream
        return train_stream, val_stream

    def build_objective(self, config: RunConfig, tokenizer: Tokenizer, train_stream: object) -> Objective:
        return LanguageModelObjective(tokenizer, sample_tokens=config.train.sample_tokens, seed=config.train.seed)
