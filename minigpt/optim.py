"""The optimiser and the learning-rate schedule.

AdamW with two parameter groups: matrices (attention and MLP weights, the embedding) get weight
decay, which keeps them from growing without bound; vectors (RMSNorm gains) do not, since
shrinking a gain towards zero only fights the normalisation.

--optimizer muon trains the transformer blocks' matrices with Muon instead (torch.optim.Muon) and
keeps AdamW for the rest. Muon orthogonalises each matrix's momentum (a few Newton-Schulz
iterations) before the update, so every direction of a layer's map moves at the same rate rather
than the few that dominate its gradient. Its learning rate is scaled to give updates of AdamW's
size ("match_rms_adamw"), so the learning rate and weight decay tuned for AdamW carry over.

The schedule warms the learning rate up linearly from near zero (early gradients are large and
noisy, and Adam's moment estimates are not yet reliable), then decays it to a floor.
"""

from __future__ import annotations

import math

import torch

from minigpt.config import TrainConfig


def build_optimizer(model: torch.nn.Module, train: TrainConfig, device_type: str) -> torch.optim.AdamW | MuonAndAdamW:
    """The optimizer train.optimizer names, over the model's trainable parameters: AdamW, or Muon
    for the blocks' matrices with AdamW for the rest."""
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    if train.optimizer == "muon":
        matrices = [parameter for name, parameter in named if trained_by_muon(name, parameter)]
        others = [parameter for name, parameter in named if not trained_by_muon(name, parameter)]
        muon = torch.optim.Muon(matrices, lr=train.learning_rate, weight_decay=train.weight_decay, adjust_lr_fn="match_rms_adamw")
        return MuonAndAdamW(muon, adamw(others, train, device_type))
    return adamw([parameter for _, parameter in named], train, device_type)


def trained_by_muon(name: str, parameter: torch.nn.Parameter) -> bool:
    """Muon takes the blocks' weight matrices: linear maps from one hidden space to another. The
    token embedding and output head (a row per token), vectors (gains, biases) and a classifier's
    head stay with AdamW. (A LoRA run or a frozen trunk trains no such matrix: run.check_config
    refuses Muon there.)"""
    return parameter.dim() == 2 and ".blocks." in f".{name}"


class MuonAndAdamW:
    """torch.optim.Muon and AdamW stepping as one optimizer: one list of parameter groups (the
    schedule sets every group's learning rate), one step, one state dict holding both."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        self.defaults: dict = {}  # not fused as a whole: the trainer reads back a bad step's flag itself

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def adamw(parameters: list[torch.nn.Parameter], train: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over `parameters`, matrices with weight decay and vectors without."""
    decay = [parameter for parameter in parameters if parameter.dim() >= 2]
    no_decay = [parameter for parameter in parameters if parameter.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (CUDA and CPU) does a whole parameter's update in one pass over memory
    # instead of a chain of elementwise operations: measured 2.7x faster on a 2-core CPU. MPS uses
    # `foreach`, which batches tensors together. --disable-optimizations keeps the plain loop.
    plain = train.disable_optimizations
    fused = device_type in ("cuda", "cpu") and not plain
    return torch.optim.AdamW(
        groups, lr=train.learning_rate, betas=(train.beta1, train.beta2), fused=fused, foreach=None if fused else not plain
    )


def learning_rate_at(step: int, train: TrainConfig, elapsed_seconds: float = 0.0) -> float:
    """The learning rate for optimiser step `step` (counting from 0).

    After warmup, the decay follows whichever end of the run comes first: the step budget
    (max_steps) or the time budget (max_time), so a run limited by time still lands on the floor.
    """
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    if train.lr_scheduler == "constant":
        return train.learning_rate
    progress = 0.0
    if train.max_steps > train.warmup_steps:
        progress = (step - train.warmup_steps) / (train.max_steps - train.warmup_steps)
    if train.max_time > 0:
        progress = max(progress, elapsed_seconds / train.max_time)
    progress = min(1.0, progress)
    if train.lr_scheduler == "linear":
        decay = 1.0 - progress
    else:  # cosine: slow at first, fastest in the middle, gentle landing at the floor
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = train.final_learning_rate
    return floor + decay * (train.learning_rate - floor)
