"""What a training stage is: everything about a run that depends on what is being learned.

Pretraining, chat fine-tuning and classification share one trainer, one checkpoint format and one
command line. What differs between them lives in one object per stage, a subclass of `Stage`:

    its data          the built-in set it trains on with no --data-files, how records are read,
                      the training and validation streams (`prepare_data`)
    its objective     what a batch means and what its loss is (`build_objective`)
    its model         the network it trains, what it takes from --init-from, what LoRA leaves
                      trainable (`build_model`, `start_from`, `after_lora`)
    its callbacks     what it adds to the loop (a classifier's confusion matrices, say), and
                      what it does with the model before the loop (`before_training`)
    its settings      the train.* settings that apply to it and not to every stage
    its recipe        the configuration a run of it starts from when no --config is given

`prepare_run` (minigpt/run.py) looks the stage up once and calls these methods; nothing else
branches on the stage's name. Adding a stage is one new module with a subclass and one entry in
`minigpt.stages.STAGES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from minigpt.config import RunConfig, preset_config
from minigpt.model import GPT
from minigpt.objective import Objective
from minigpt.tokenizer import Tokenizer
from minigpt.trainer import Callback, Trainer

DEFAULT_PRESET = "medium"  # what `minigpt train` trains with no --config


class Stage:
    """One way of training the model. Subclasses set the class attributes and override the
    methods that differ; the defaults here are those of a language-model stage."""

    name: ClassVar[str]
    help: ClassVar[str]  # one line for --stage's help
    # The train.* settings that apply to this stage and not to every stage: such a setting given
    # for another stage is refused (minigpt.stages.check_stage_settings). A setting no stage
    # lists applies to all of them.
    settings: ClassVar[frozenset[str]] = frozenset()
    # True: the data are conversations rendered with the chat template, and the model trained is
    # one to chat with (`minigpt chat` expects it; the sample at each evaluation is a reply).
    chat: ClassVar[bool] = False
    # True: the built-in text sets ("builtin", "builtin-sft") may be named among --data-files
    # (they hold plain text and conversations, not the records every stage reads).
    reads_builtin_text: ClassVar[bool] = True
    # True: the training data are in memory, so counting an epoch's steps costs nothing and every
    # run reports its epoch; otherwise only runs given --num-epochs read the data once to count.
    epochs_cost_nothing: ClassVar[bool] = False

    def default_config(self, starting_from_model: bool) -> RunConfig:
        """The configuration a run starts from when the user names no --config (a preset, or
        the stage's recipe); `starting_from_model`: --init-from was given."""
        return preset_config(DEFAULT_PRESET)

    def check(self, config: RunConfig) -> None:
        """Refuse, in one sentence (UserInputError), a combination of settings this stage cannot train."""

    def starting_from_scratch(self) -> None:
        """Called when a new run of this stage starts with no --init-from (a warning, where that is unusual)."""

    def builtin_sources(self, config: RunConfig) -> tuple[RunConfig, list]:
        """The data a run trains on when given none: the configuration (which may name the
        built-in files it wrote) and the training sources."""
        raise NotImplementedError

    def prepare_data(self, config: RunConfig, sources: list, tokenizer: Tokenizer, device: torch.device,
                     resumed: bool) -> tuple[RunConfig, Any, Any]:
        """The configuration with whatever the data decide (a validation split that fits, label
        maps), the endless training stream and the finite validation stream (or None).
        `resumed`: the run continues from a checkpoint, whose config.json already decided them."""
        raise NotImplementedError

    def build_objective(self, config: RunConfig, tokenizer: Tokenizer, train_stream: Any) -> Objective:
        raise NotImplementedError

    def build_model(self, config: RunConfig) -> GPT:
        """The network this stage trains, on the current default device (the meta device for an estimate)."""
        return GPT(config.model)

    def start_from(self, model: GPT, initial: GPT) -> None:
        """Load the --init-from model's weights into `model` (a model of the same shape, checked before)."""
        model.load_state_dict(initial.state_dict())

    def after_lora(self, model: GPT) -> None:
        """Make trainable what must train besides the adapters (LoRA has frozen everything else)."""

    def before_training(self, trainer: Trainer, resumed: bool) -> None:
        """Work with the model before the first step, once the trainer is built and, on --resume,
        restored from its checkpoint (DPO computes, or reads back, its reference log-probabilities)."""

    def callbacks(self, config: RunConfig) -> list[Callback]:
        """Callbacks this stage adds to the loop."""
        return []

    def final_model_note(self, evaluated: bool) -> str:
        """What final_model/ holds, said after its path ("" for the last step's weights, the usual);
        `evaluated`: the run had validation data."""
        return ""

    def next_steps(self, final_model: Path) -> list[tuple[str, str]]:
        """What to do with the trained model: (label, command) lines printed after the run;
        a command is given without the program name (`generate DIR --prompt "..."`)."""
        return [("Generate text", f'generate {final_model} --prompt "..."')]
