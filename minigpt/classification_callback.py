"""What a classifier run adds to the training loop: a callback (the objective itself,
`minigpt.classification.ClassificationObjective`, sits below the trainer and knows nothing of it).

    at every evaluation   a confusion-matrix PNG per task under plots/ (and a _latest copy)
    at the end            final_model/ holds the best evaluation's weights, not the last ones:
                          early stopping stops *after* the best, and a run that overfits passes it
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from minigpt.files import atomic_write_bytes
from minigpt.lora import merge_lora
from minigpt.plots import save_confusion_matrix
from minigpt.trainer import Callback, Trainer

log = logging.getLogger("minigpt.classification")


class ClassifierCallback(Callback):
    """A confusion matrix PNG per task at every evaluation, and the best evaluation's weights as
    final_model/ (`final_model`: the trainer asks once, and writes final_model/ once).

    A LoRA classifier's adapters are merged into its weights there, so final_model/ always holds
    one complete classifier that loads on its own. The best weights are kept in memory, so a
    resumed run's final model is the best evaluation since the resume.
    """

    def __init__(self) -> None:
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_step = 0

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any]) -> None:
        for task, scores in row["tasks"].items():
            plots = trainer.run_dir / "plots"
            title = f"{task} at step {row['step']}: macro-F1 {scores['f1_macro']:.3f}, accuracy {scores['accuracy']:.3f}"
            try:
                first = save_confusion_matrix(plots / f"confusion_{task}_step_{row['step']}.png", scores["confusion"], scores["labels"], title)
                atomic_write_bytes(plots / f"confusion_{task}_latest.png", first.read_bytes())  # drawn once, copied whole
            except Exception as error:  # noqa: BLE001 - a plot must never stop training
                log.warning("Could not draw the confusion matrix of %s: %s", task, error)
        if trainer.progress.evaluations_without_improvement == 0:  # this evaluation is the best so far
            self.best_state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in trainer.model.state_dict().items()}
            self.best_step = row["step"]

    def final_model(self, trainer: Trainer) -> torch.nn.Module:
        """The trained classifier with the best evaluation's weights loaded (the last weights when
        nothing was evaluated), its LoRA adapters merged in."""
        model = trainer.model
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
            metric = trainer.objective.monitor.metric
            log.info("final_model/ holds the best evaluation: step %d, %s %.4f", self.best_step, metric,
                     trainer.progress.best_metric if trainer.progress.best_metric is not None else float("nan"))
        return merge_lora(copy.deepcopy(model)) if trainer.adapter is not None else model
