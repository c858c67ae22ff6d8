"""Optional metric sinks that users of other frameworks expect: TensorBoard and Weights & Biases.

Both are callbacks on the one training loop and both are optional extras:
    pip install -e ".[tensorboard]"   then  --tensorboard   (event files under <run>/tensorboard/)
    pip install -e ".[wandb]"         then  --wandb         (offline by default: <run>/wandb/;
                                                           set WANDB_MODE=online to upload)
metrics.jsonl stays the record of truth; these only mirror it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from minigpt.errors import UserInputError
from minigpt.metrics import evaluation_scalars
from minigpt.trainer import Callback, Trainer

SCALAR_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_second", "mfu", "cpu_percent", "system_memory_percent")


def _missing_extra(flag: str, extra: str) -> UserInputError:
    return UserInputError(f"{flag} needs the optional '{extra}' package: pip install -e \".[{extra}]\"")


class TensorBoardCallback(Callback):
    """Scalars at every log row and evaluation, weight and gradient histograms at every
    evaluation interval, and the configuration as text."""

    def __init__(self, config: dict[str, Any], histogram_steps: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing_extra("--tensorboard", "tensorboard") from None
        self.summary_writer, self.config = SummaryWriter, config
        self.writer: Any = None
        self.histogram_steps = histogram_steps
        self.next_histogram = 0

    def on_start(self, trainer: Trainer) -> None:
        # Here, not in __init__: nothing is written before every check of the run has passed.
        self.writer = self.summary_writer(log_dir=str(trainer.run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=2) + "\n```")

    def on_gradients(self, trainer: Trainer) -> None:
        step = trainer.progress.step + 1  # the step being taken
        if step < self.next_histogram:
            return
        self.next_histogram = step + self.histogram_steps
        for name, parameter in trainer.model.named_parameters():
            self.writer.add_histogram(f"weights/{name}", parameter.detach().float().cpu(), step)
            if parameter.grad is not None:
                self.writer.add_histogram(f"gradients/{name}", parameter.grad.detach().float().cpu(), step)

    def on_log(self, trainer: Trainer, row: dict[str, Any]) -> None:
        for name in SCALAR_FIELDS:
            if row.get(name) is not None:
                self.writer.add_scalar(f"train/{name}", row[name], row["step"])
        self.writer.flush()

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any]) -> None:
        for name, value in evaluation_scalars(row).items():
            self.writer.add_scalar(f"eval/{name}", value, row["step"])
        self.writer.flush()

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.writer.close()


class WandbCallback(Callback):
    """Logs the same scalars to Weights & Biases; offline unless WANDB_MODE says otherwise."""

    def __init__(self, config: dict[str, Any], project: str = "minigpt"):
        try:
            import wandb
        except ImportError:
            raise _missing_extra("--wandb", "wandb") from None
        self.wandb, self.config, self.project = wandb, config, project
        self.run: Any = None

    def on_start(self, trainer: Trainer) -> None:
        # Here, not in __init__: the run directory exists only now, and W&B given a directory that
        # does not exist writes its offline logs to the temporary directory instead.
        self.run = self.wandb.init(
            project=self.project, name=trainer.run_dir.name, dir=str(trainer.run_dir), config=self.config,
            mode=os.environ.get("WANDB_MODE", "offline"),  # offline by default: nothing leaves the machine
        )

    def on_log(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.run.log({f"train/{name}": row[name] for name in SCALAR_FIELDS if row.get(name) is not None}, step=row["step"])

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.run.log({f"eval/{name}": value for name, value in evaluation_scalars(row).items()}, step=row["step"])

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.run.summary.update({key: value for key, value in summary.items() if value is not None})
        self.run.finish()
