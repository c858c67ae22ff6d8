"""Chat fine-tuning: next-token prediction on the assistant's words only.

Conversations are rendered with the chat template (ChatML) and the targets of every token the
assistant did not write (system and user turns, the template's markers) are masked out: the
model learns to answer, not to ask. Conversations stay whole: several share a row (--packing on,
the default), each attending only to itself with its positions starting at 0, so each one's loss
is what it would be on a row of its own; or each has a row of its own (--packing off). With no data given, it trains
on the built-in chat set about Python (`minigpt.sft_corpus`). It starts from a trained model
(--init-from); from scratch it would have to learn the language from the replies alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from minigpt.config import RunConfig
from minigpt.objective import LanguageModelObjective, Objective
from minigpt.sft_corpus import BUILTIN_SFT
from minigpt.stages.pretrain import LANGUAGE_MODEL_SETTINGS, PretrainStage
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.run")


class SFTStage(PretrainStage):
    name = "sft"
    help = "chat fine-tuning: the loss on the assistant's words only"
    settings = LANGUAGE_MODEL_SETTINGS | {"sample_prompt", "packing"}
    chat = True

    def starting_from_scratch(self) -> None:
        log.warning("Chat fine-tuning a model from scratch: it knows no language yet. Start from a trained one with --init-from.")

    def builtin_sources(self, config: RunConfig) -> tuple[RunConfig, list]:
        return config, [BUILTIN_SFT]

    def block_stream_options(self, config: RunConfig) -> dict[str, bool]:
        packed = config.train.packing == "on"
        return dict(assistant_only_loss=True, one_document_per_row=not packed, pack_documents=packed)

    def build_objective(self, config: RunConfig, tokenizer: Tokenizer, train_stream: object) -> Objective:
        train = config.train
        return LanguageModelObjective(tokenizer, sample_tokens=train.sample_tokens, seed=train.seed, sample_chat_prompt=train.sample_prompt,
                                      packed=train.packing == "on")

    def next_steps(self, final_model: Path) -> list[tuple[str, str]]:
        return [("Chat with it", f"chat {final_model}")]
