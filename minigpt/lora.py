"""LoRA (low-rank adaptation), written out: fine-tune a few small matrices, keep the model frozen.

Full fine-tuning updates every weight W (out x in) of the model. LoRA (Hu et al., 2021) keeps
W frozen and learns a low-rank correction instead:

    y = W x + (alpha / R) * B (A x)          A: R x in  (starts small and random)
                                             B: out x R (starts at zero, so at step 0 y = W x)

Parameter count, by hand: a Linear(in, out) has in * out weights; its adapter has
R * in + out * R = R * (in + out). For the `small` preset's q_proj (384 -> 384) at R = 8 that
is 8 * 768 = 6,144 trainable numbers instead of 147,456: 4%, about 2R / width for a square
matrix. Over every attention and MLP matrix of that preset the adapters come to 0.33M of 12.2M
parameters (2.7%; wider models, smaller shares), so the gradients and the optimizer's state
(two floats per trainable weight for AdamW) shrink to that share. The activations kept for the
backward pass do not shrink: at large batches they dominate (benchmarks/lora_memory.py).

alpha / R scales the update so that changing R does not change how large the update starts
out; dropout (on the adapter's input only) regularises small fine-tuning sets.

Once trained, B A is an ordinary out x in matrix: `merge_lora` folds W + (alpha/R) B A back into
plain nn.Linear layers, so a merged model costs nothing extra at inference.

    apply_lora(model, LoRAConfig(...))    wrap the chosen Linear layers, freeze everything else
    store_frozen_base(model, dtype)       keep the frozen matrices in the run's bfloat16/float16
    lora_state_dict / load_lora_state_dict   the adapter weights alone
    merge_lora                            fold the adapters into the weights

Saving an adapter and loading it back onto its base model (checked by its SHA-256 checksum) is
`minigpt.model_folder`'s `save_adapter` and `load`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from minigpt.errors import UserInputError
from minigpt.model import GPT

# Short target names -> the Linear layers of minigpt.model they stand for.
LORA_TARGETS = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",  # attention
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",  # SwiGLU MLP
}


@dataclass
class LoRAConfig:
    """How the adapters look: rank R, scale alpha (the update is multiplied by alpha / R),
    dropout on the adapter's input, and which layers get one (short names, see LORA_TARGETS)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(LORA_TARGETS)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserInputError(f"The LoRA rank must be a whole number of at least 1, got {self.rank}.")
        if not self.alpha > 0:
            raise UserInputError(f"The LoRA alpha must be positive, got {self.alpha}.")
        if not 0 <= self.dropout < 1:
            raise UserInputError(f"The LoRA dropout must be in [0, 1), got {self.dropout}.")
        unknown = [target for target in self.targets if target not in LORA_TARGETS]
        if unknown or not self.targets:
            raise UserInputError(
                f"Unknown LoRA target(s) {', '.join(unknown) or '(none given)'}; choose among {', '.join(LORA_TARGETS)}."
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
    """A command line's "q,v" or "all" as target names (validated when a LoRAConfig is built)."""
    if text.strip() == "all":
        return tuple(LORA_TARGETS)
    return tuple(name.strip() for name in text.split(",") if name.strip())


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        # A as nn.Linear's own default (Kaiming-uniform, as in PEFT), B zero: B A = 0 at the start,
        # so the wrapped model computes exactly what the base model does, and gradients reach B
        # at once (through A x, which is not zero) and A from the next step on.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base.weight.dtype
        if x.dtype != base and not torch.is_autocast_enabled(x.device.type):
            # A base stored in bfloat16 (store_frozen_base) read outside autocast: multiply in its dtype.
            frozen = self.base(x.to(base)).to(x.dtype)
        else:
            frozen = self.base(x)
        # Scaling the R-wide middle rather than the out-wide result gives the same sum with one
        # full-size temporary fewer, forward and backward.
        return frozen + self.lora_B(self.lora_A(self.dropout(x)) * self.scale)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with weight W + scale * B A (computed in float32, stored in W's dtype)."""
        weight = self.base.weight
        update = self.lora_B.weight.float() @ self.lora_A.weight.float()
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_((weight.float() + self.scale * update).to(weight.dtype))
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def _replace_modules(model: nn.Module, replace: Callable[[str, nn.Module], nn.Module | None]) -> None:
    """Swap submodules in place: `replace(name, module)` returns the new module, or None to keep it."""
    for name, module in list(model.named_modules()):
        new = replace(name, module)
        if new is not None:
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, new)


def apply_lora(model: GPT, config: LoRAConfig) -> GPT:
    """Wrap every Linear layer named by `config.targets` in a LoRALinear and freeze the rest.

    Like torchao's `convert_to_float8_training(model, module_filter_fn=...)`, this swaps modules
    in place and returns the same model; apply it before torch.compile and before building the
    optimizer (which then gets `lora_parameters(model)`).
    """
    layer_names = {LORA_TARGETS[target] for target in config.targets}
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    def wrap(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in layer_names:
            return LoRALinear(module, config.rank, config.alpha, config.dropout)
        return None

    _replace_modules(model, wrap)
    return model


def store_frozen_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the frozen matrices under the adapters in `dtype`, a run's bfloat16/float16 compute
    dtype. Autocast multiplies in that dtype anyway (it would round a float32 weight to it at every
    step), so the numbers are the same, and the base takes half the memory with no per-step copy.
    The adapters, and so AdamW's state, stay float32; norms and embeddings keep their dtype."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.base.to(dtype)


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its layer: the model becomes a plain GPT again (all weights trainable)."""
    _replace_modules(model, lambda name, module: module.merged() if isinstance(module, LoRALinear) else None)
    model.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices: what the optimizer trains."""
    return [parameter for module in model.modules() if isinstance(module, LoRALinear)
            for parameter in (module.lora_A.weight, module.lora_B.weight)]


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied matrix counts once."""
    parameters = list(model.parameters())  # .parameters() already yields a shared tensor once
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def format_trainable(trainable: int, total: int) -> str:
    """E.g. `trainable 0.41M of 25.8M (1.6%)`."""
    return f"trainable {trainable / 1e6:.2f}M of {total / 1e6:.1f}M ({100 * trainable / total:.1f}%)"


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, named as in the model (`blocks.0.attention.q_proj.lora_A.weight`)."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".lora_A." in name or ".lora_B." in name}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into a model wrapped with the same LoRAConfig, or say why they do not fit."""
    expected = lora_state_dict(model)
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise UserInputError(
            f"The adapter weights do not fit this model (missing {missing[:2] or 'none'}, unexpected {unexpected[:2] or 'none'}); "
            "was it trained with other --lora-targets?"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserInputError(
                f"Adapter weight {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}; "
                "was it trained with another rank or base model?"
            )
    model.load_state_dict(state, strict=False)
