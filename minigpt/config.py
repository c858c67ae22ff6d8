"""Configuration: what the model looks like and how it is trained.

Two dataclasses hold every setting: `ModelConfig` (the shape of the network) and `TrainConfig`
(data, optimisation, schedule, logging, output). A run is configured in three layers, each
overriding the one before:

    1. a named preset (`tiny`, `small`, `medium`, `large`) or the dataclass defaults,
    2. a TOML, JSON or YAML file with `[model]` and `[train]` tables (and an optional `preset = "..."`),
    3. command-line flags, applied as dotted overrides such as `{"model.n_layer": 6}`.

`validate` then turns any impossible combination into one plain sentence (a `UserInputError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from minigpt.errors import UserInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class ModelConfig:
    """The decoder's shape. `vocab_size = 0` means: use the tokenizer's vocabulary size."""

    vocab_size: int = 0
    block_size: int = 256  # longest context the model sees (rotary tables are built this long)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # key/value heads; fewer than n_head = grouped-query attention; 0 = n_head
    n_embd: int = 128
    ffn_hidden: int = 0  # SwiGLU hidden width; 0 = 8/3 of n_embd rounded up to a multiple of 64
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # Pretrained families (issue #27). MiniGPT's own models leave every switch below at its default;
    # a Hugging Face folder sets the ones its family needs (minigpt/families.py reads them from its config.json).
    family: str = "minigpt"  # whose layout the weights follow: minigpt, llama, qwen2, qwen3, gemma3 (export writes it back)
    head_size: int = 0  # channels per attention head; 0 = n_embd // n_head (Qwen3 and Gemma 3 choose their own)
    attention_bias: bool = False  # Qwen2: biases on the q, k and v projections
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's queries and keys before rotary
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight), so a zero weight is the identity
    sandwich_norms: bool = False  # Gemma 3: a norm after attention and after the MLP too, before the residual add
    mlp_activation: str = "silu"  # the MLP's gate: silu (SwiGLU), or gelu_tanh (Gemma's GeGLU)
    scale_embeddings: bool = False  # Gemma: token embeddings are multiplied by sqrt(n_embd)
    query_pre_attn_scalar: float = 0.0  # Gemma 3: attention scores scale by 1/sqrt(this); 0 = 1/sqrt(head_dim)
    rope_scaling: dict = field(default_factory=dict)  # Llama 3.x: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    sliding_window: int = 0  # Gemma 3: a local layer's query sees this many latest keys; 0 = no local layers
    layer_types: list[str] = field(default_factory=list)  # per layer: full_attention or sliding_attention; empty = all full
    rope_local_theta: float = 0.0  # Gemma 3: the rotary base of sliding-window layers; 0 = rope_theta

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        # SwiGLU has three matrices instead of two, so 8/3 of the width keeps the parameter
        # count of a classic 4x MLP; rounding to 64 keeps the matrix shapes fast.
        return 64 * ((8 * self.n_embd // 3 + 63) // 64)


@dataclass
class TrainConfig:
    """Everything about a training run except the model's shape."""

    # what is learned
    stage: str = "pretrain"  # pretrain: next token, every token; sft: chat fine-tuning, loss on the assistant's words only; dpo, classify
    init_from: str = ""  # start from this model (final_model/, checkpoint, run or Hugging Face Llama, Qwen2, Qwen3 or Gemma 3 folder); empty = scratch
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen base instead of every weight
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = "q,k,v,o,gate,up,down"  # the linear layers that get adapters (or "all")
    sample_prompt: str = "What does the len function do?"  # sft: the message answered as the sample at each evaluation
    # data
    data_files: list[str] = field(default_factory=list)  # empty = the built-in corpus
    val_data_files: list[str] = field(default_factory=list)  # empty = hold out val_fraction
    val_fraction: float = 0.01
    use_full_data: bool = False  # train on every .jsonl/.txt file under data/
    max_data_size: int = 0  # cap on training documents; 0 = no cap
    text_field: str = "text"
    shuffle_buffer: int = 1000  # blocks held for shuffling; 0 = read in order
    token_cache: bool = False  # tokenize the sources once into <output_dir>/token_cache/ and train from it
    # sft: "on" lays several whole conversations in a row, each seeing only itself (minigpt.data);
    # "off", one conversation per row. Kept by --resume: a checkpoint's data position belongs to one layout.
    packing: str = "on"
    # tokenizer
    tokenizer_path: str = ""  # an existing tokenizer.json to use; empty = train one (or reuse the cached one)
    tokenizer_type: str = "bpe"  # "auto": characters for Chinese/Japanese/Korean text, else BPE (tokenizer.choose_tokenizer_type)
    tokenizer_vocab_size: int = 6400
    tokenizer_samples: int = 0  # documents used to train the tokenizer; 0 = all
    retrain_tokenizer: bool = False
    # optimisation
    optimizer: str = "adamw"  # muon: Muon for the blocks' matrices, AdamW for the rest (minigpt.optim)
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule's floor as a fraction of the peak learning rate
    min_learning_rate: float = 0.0  # an absolute floor instead; 0 = min_lr_ratio x learning_rate
    lr_scheduler: str = "cosine"
    warmup_steps: int = 100
    warmup_ratio: float = 0.0  # > 0: warmup is this fraction of the run's steps (resolved into warmup_steps when it starts)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    # memory (minigpt.memory)
    auto_batch_size: bool = False  # --batch-size auto: the largest micro-batch that fits and pays, same global batch
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass
    # length of the run
    max_steps: int = 5000
    max_time: float = 0.0  # wall-clock budget in seconds; 0 = none
    num_epochs: float = 0.0  # > 0: passes over the training data (bounded by an explicit max_steps / max_time too)
    min_epochs: float = 0.0  # > 0: max_steps grows to at least this many passes over the data (max_time still bounds)
    epoch_steps: int = 0  # optimizer steps in one epoch: counted when a run that needs it starts, recorded for --resume
    # evaluation, checkpoints, logging
    eval_steps: int = 250
    eval_strategy: str = "steps"  # steps: every eval_steps; epoch: at the end of each epoch
    eval_batches: int = 20
    save_steps: int = 500
    save_strategy: str = "steps"  # steps: every save_steps; epoch: at the end of each epoch
    keep_checkpoints: int = 3
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    log_steps: int = 10
    sample_tokens: int = 48  # tokens generated as a sample at each evaluation; 0 = none
    plot_loss: bool = False
    report: bool = False  # write report.md and report.html (minigpt.report) when the run ends
    # output
    output_dir: str = "checkpoints"
    run_name: str = ""  # empty = "<preset>-<date>-<time>"
    resume: str = ""  # "" = fresh run; "latest" = latest checkpoint of the run; or a checkpoint directory
    # runtime
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    compile_mode: str = "auto"  # torch.compile mode; auto = max-autotune on CUDA, default elsewhere
    disable_optimizations: bool = False  # eager, float32, plain AdamW loops, math attention: for debugging
    num_threads: int = 0  # CPU threads; 0 = the physical cores available (under torchrun: split between a machine's processes)
    ddp_backend: str = "auto"  # under torchrun: auto = nccl on CUDA, gloo on the CPU
    dataloader_workers: int = -1  # processes reading data; -1 = auto (CUDA: up to 4; CPU, MPS: 0, the main process)
    # monitoring and resources
    max_cpu: float = 0.0  # hold the process at or below this % of the machine's CPU; 0 = no limit
    max_memory: float = 0.0  # stop cleanly (with a checkpoint) past this % of system memory; 0 = no limit
    disable_monitoring: bool = False  # no CPU/memory sampling, no anomaly checks (--max-cpu/--max-memory still hold)
    # debugging
    overfit_batch: bool = False  # train on one fixed batch: the loss must go to ~0
    profile: bool = False  # print where the step time goes after a few steps
    # sinks
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "minigpt"  # the W&B project the run is logged to (its name there is the run's name)
    # classification (stage "classify"; see minigpt.labelled_data and minigpt.heads)
    tasks: str = ""  # comma-separated tasks to train; empty = every "<task>_labels" field of the data
    task_weights: str = ""  # "sentiment=1,toxicity=0.5": each task's loss is multiplied by its weight (default 1)
    class_weights: str = "none"  # balanced: weigh each class by records / (classes * its records)
    pooling: str = "last"  # last: the last real token's vector; mean: the average over real tokens; max: each feature's largest
    freeze_trunk: bool = False  # train only the heads on a frozen --init-from model (a linear probe)
    # classify: "on" sorts each run of 16 training batches' texts by length before cutting them into
    # batches (less padding: about twice the steps per second; the batches' mix changes); "auto", on
    # for a set of more than 5,000 texts (minigpt.classification.LARGE_SET_RECORDS)
    group_by_length: str = "off"
    lm_loss_weight: float = 0.0  # add this x the next-token loss on the texts to the classification loss; 0 = off
    label_maps: dict = field(default_factory=dict)  # task -> labels in id order; found in the training data
    # preference tuning (stage "dpo"; see minigpt.stages.dpo)
    dpo_beta: float = 0.1  # how far from the reference the model may move: the reward is beta x log(pi / pi_ref)
    # add this x the chosen reply's mean negative log-likelihood per token to the loss (RPO); 0 = pure DPO. 1 by default:
    # on the built-in set it held the chosen replies' likelihood where pure DPO lowered it (benchmarks/dpo_builtin.py, README)
    rpo_alpha: float = 1.0
    ref_model: str = ""  # the reference model; empty = the model the run starts from

    @property
    def final_learning_rate(self) -> float:
        """Where the schedule's decay ends: min_learning_rate if set, else min_lr_ratio of the peak.
        A fraction keeps the floor below the peak whatever learning rate a run is given."""
        return self.min_learning_rate or self.min_lr_ratio * self.learning_rate


@dataclass
class RunConfig:
    """The full configuration of a run: model shape plus training settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "configuration") -> "RunConfig":
        unknown = set(values) - {"model", "train", "preset"}
        if unknown:
            nearest = difflib.get_close_matches(sorted(unknown)[0], ["model", "train", "preset"], n=1)
            hint = f" (did you mean '{nearest[0]}'?)" if nearest else ""
            raise UserInputError(
                f"{source} has unknown top-level key(s) {sorted(unknown)}{hint}; use 'preset', [model] and [train]."
            )
        for section in ("model", "train"):
            if not isinstance(values.get(section, {}), Mapping):
                raise UserInputError(f"{source}: '{section}' must be a table/object of settings, got {values[section]!r}.")
        if not isinstance(values.get("preset", ""), str):
            raise UserInputError(f"{source}: 'preset' must be a preset's name, got {values['preset']!r}.")
        config = preset_config(values["preset"]) if values.get("preset") else cls()
        overrides = {f"{section}.{key}": value for section in ("model", "train") for key, value in values.get(section, {}).items()}
        return apply_overrides(config, overrides, source=source)


# Named presets: a starting point for each scale. Each is a set of overrides on the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # Trains in seconds on a laptop CPU: for tests, tutorials and trying things out.
    "tiny": {
        "model.block_size": 64, "model.n_layer": 2, "model.n_head": 4, "model.n_kv_head": 2, "model.n_embd": 64,
        "train.tokenizer_vocab_size": 512, "train.batch_size": 8, "train.learning_rate": 3e-3,
        "train.warmup_steps": 10, "train.max_steps": 200, "train.eval_steps": 50,
        "train.eval_batches": 4, "train.save_steps": 100, "train.log_steps": 10, "train.shuffle_buffer": 64,
    },
    # About 12M parameters: a real little model that trains on a CPU in an hour or so.
    "small": {
        "model.block_size": 256, "model.n_layer": 6, "model.n_head": 6, "model.n_kv_head": 2, "model.n_embd": 384,
        "train.batch_size": 16, "train.learning_rate": 1e-3, "train.warmup_steps": 100, "train.max_steps": 5000,
        "train.eval_steps": 100, "train.save_steps": 200,
    },
    # About 26M parameters, the size of MiniMind2-Small (8 layers of width 512, 2 key/value heads).
    # A step is 2,048 tokens so a CPU shows progress within minutes; raise batch_size on a GPU.
    "medium": {
        "model.block_size": 512, "model.n_layer": 8, "model.n_head": 8, "model.n_kv_head": 2, "model.n_embd": 512,
        "train.batch_size": 4, "train.learning_rate": 6e-4, "train.warmup_steps": 50,
        "train.max_steps": 20000, "train.eval_steps": 50, "train.eval_batches": 10, "train.save_steps": 50,
        "train.log_steps": 5,
    },
    # About 105M parameters (16 layers of width 768): a GPU model.
    "large": {
        "model.block_size": 512, "model.n_layer": 16, "model.n_head": 12, "model.n_kv_head": 4, "model.n_embd": 768,
        "train.batch_size": 16, "train.gradient_accumulation_steps": 4, "train.learning_rate": 3e-4,
        "train.warmup_steps": 500, "train.max_steps": 50000, "train.eval_steps": 500,
        "train.save_steps": 1000,
    },
}

CHOICES = {
    "train.optimizer": ("adamw", "muon"),
    "train.lr_scheduler": ("cosine", "linear", "constant"),
    "train.tokenizer_type": ("bpe", "char", "auto"),
    "train.device": ("auto", "cpu", "cuda", "mps"),
    "train.dtype": ("auto", "float32", "bfloat16", "float16"),
    "train.ddp_backend": ("auto", "nccl", "gloo"),
    "train.compile_mode": ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "train.class_weights": ("none", "balanced"),
    "train.pooling": ("last", "mean", "max"),
    "train.eval_strategy": ("steps", "epoch"),
    "train.packing": ("on", "off"),
    "train.group_by_length": ("on", "off", "auto"),
    "train.save_strategy": ("steps", "epoch"),
}


CONFIG_SUFFIXES = (".toml", ".json", ".yaml", ".yml")


def preset_config(name: str) -> RunConfig:
    """The configuration of a named preset."""
    if name not in PRESETS:
        raise UserInputError(f"Unknown preset '{name}'; choose one of {', '.join(PRESETS)} or give a .toml/.json/.yaml file.")
    return apply_overrides(RunConfig(preset=name), PRESETS[name], source=f"preset '{name}'")


def load_config(name_or_path: str) -> RunConfig:
    """A preset by name, or a configuration read from a TOML, JSON or YAML file."""
    if name_or_path in PRESETS:
        return preset_config(name_or_path)
    path = Path(name_or_path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise UserInputError(
            f"--config '{name_or_path}' is neither a preset ({', '.join(PRESETS)}) nor a .toml/.json/.yaml file."
        )
    if not path.is_file():
        raise UserInputError(f"Configuration file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as error:  # RecursionError: absurdly deep nesting
        raise UserInputError(f"Configuration file {path} could not be parsed: {error}.") from None
    if not isinstance(values, dict):
        raise UserInputError(f"Configuration file {path} must hold a table/object at the top level.")
    return RunConfig.from_dict(values, source=str(path))


def apply_overrides(config: RunConfig, overrides: Mapping[str, Any], source: str = "override") -> RunConfig:
    """Return a copy of `config` with dotted keys (`"model.n_layer"`, `"train.learning_rate"`) replaced.

    Values may be strings (as typed on a command line); they are converted to the field's type.
    """
    sections = {"model": dataclasses.replace(config.model), "train": dataclasses.replace(config.train)}
    overrides = _with_implied_settings(overrides, source)
    for key, value in overrides.items():
        section_name, _, field_name = key.partition(".")
        section = sections.get(section_name)
        fields = {f.name: f for f in dataclasses.fields(section)} if section is not None else {}
        if field_name not in fields:
            raise UserInputError(f"{source}: unknown setting '{key}'{_nearest_setting(key, sections)}.")
        setattr(section, field_name, _convert(value, fields[field_name], key, source))
    return RunConfig(model=sections["model"], train=sections["train"], preset=config.preset)


def _with_implied_settings(overrides: Mapping[str, Any], source: str) -> dict[str, Any]:
    """What giving one setting implies for another set in an earlier layer (a preset, say).

    A W&B project turns W&B on. A number of epochs replaces the preset's step count (an explicit
    max_steps in the same layer still bounds the run); a warmup ratio replaces the preset's warmup
    steps and warmup steps an earlier layer's ratio, and giving both warmup settings in one layer
    is a contradiction."""
    implied = dict(overrides)
    if "train.wandb_project" in implied and "train.wandb" not in implied:
        implied["train.wandb"] = True  # naming a W&B project asks for W&B
    if "train.num_epochs" in implied and "train.max_steps" not in implied:
        implied["train.max_steps"] = 0
    if ("train.num_epochs" in implied or "train.max_steps" in implied) and "train.min_epochs" not in implied:
        implied["train.min_epochs"] = 0.0  # a length given later replaces an earlier layer's floor (the classify recipe's)
    if "train.warmup_steps" in implied and "train.warmup_ratio" not in implied:
        implied["train.warmup_ratio"] = 0.0
    if "train.warmup_ratio" in implied:
        if "train.warmup_steps" not in implied:
            implied["train.warmup_steps"] = 0
        elif _is_nonzero(implied["train.warmup_ratio"]) and _is_nonzero(implied["train.warmup_steps"]):
            raise UserInputError(f"{source}: give the warmup either as warmup_steps or as warmup_ratio, not both.")
    return implied


def _is_nonzero(value: Any) -> bool:
    try:
        return float(value) != 0
    except (TypeError, ValueError):
        return True  # not a number: the conversion reports it


def _nearest_setting(key: str, sections: Mapping[str, Any]) -> str:
    """"; did you mean 'train.learning_rate'?" for a mistyped key, or "" when nothing is close."""
    valid = [f"{name}.{spec.name}" for name, section in sections.items() for spec in dataclasses.fields(section)]
    nearest = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean '{nearest[0]}'?" if nearest else ""


def _convert(value: Any, spec: dataclasses.Field, key: str, source: str) -> Any:
    """Convert a value to the type of a dataclass field, or explain why it cannot be."""
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    expected = type(default)
    if expected is dict:
        if not isinstance(value, Mapping):
            raise UserInputError(f"{source}: '{key}' must be a table/object, got {value!r}.")
        return dict(value)
    if expected is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise UserInputError(f"{source}: '{key}' must be a list, got {value!r}.")
        return [str(item) for item in items if str(item)]
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserInputError(f"{source}: '{key}' must be true or false, got {value!r}.")
    try:
        if expected is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        converted = expected(value)
        if expected is float and not math.isfinite(converted):  # JSON's NaN/Infinity literals pass every comparison check
            raise ValueError
        return converted
    except (TypeError, ValueError):
        raise UserInputError(f"{source}: '{key}' must be {expected.__name__}, got {value!r}.") from None


FAMILY_NAMES = ("minigpt", "llama", "qwen2", "qwen3", "gemma3")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_SCALING_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def validate_family_switches(model: ModelConfig) -> None:
    """Refuse, in one sentence, pretrained-family switches the model could not honour (a value no
    code reads would otherwise be silently ignored)."""
    if model.family not in FAMILY_NAMES:
        raise UserInputError(f"model.family must be one of {', '.join(FAMILY_NAMES)}, got '{model.family}'.")
    if model.mlp_activation not in MLP_ACTIVATIONS:
        raise UserInputError(f"model.mlp_activation must be one of {', '.join(MLP_ACTIVATIONS)}, got '{model.mlp_activation}'.")
    if model.layer_types and (len(model.layer_types) != model.n_layer or set(model.layer_types) - set(LAYER_TYPES)):
        raise UserInputError(f"model.layer_types lists one of {', '.join(LAYER_TYPES)} per layer ({model.n_layer}), "
                             f"got {model.layer_types}.")
    if ("sliding_attention" in model.layer_types) != (model.sliding_window > 0):
        raise UserInputError("model.sliding_window and sliding_attention layers in model.layer_types go together: set both or neither.")
    if model.rope_scaling:
        rope_type = model.rope_scaling.get("rope_type")
        missing = [key for key in ROPE_SCALING_KEYS.get(rope_type, ()) if key not in model.rope_scaling]
        numbers = [model.rope_scaling.get(key) for key in ROPE_SCALING_KEYS.get(rope_type, ())]
        if rope_type not in ROPE_SCALING_KEYS or missing or not all(_positive_number(value) for value in numbers):
            raise UserInputError(f"model.rope_scaling must be {{}} or a linear or llama3 scaling with its settings as positive numbers "
                                 f"({', '.join(f'{name}: {keys}' for name, keys in ROPE_SCALING_KEYS.items())}), got {model.rope_scaling}.")
        if rope_type == "llama3" and not model.rope_scaling["high_freq_factor"] > model.rope_scaling["low_freq_factor"]:
            raise UserInputError(f"model.rope_scaling's high_freq_factor must be above its low_freq_factor, got {model.rope_scaling}.")
    if min(model.head_size, model.sliding_window, model.query_pre_attn_scalar, model.rope_local_theta) < 0:
        raise UserInputError("model.head_size, sliding_window, query_pre_attn_scalar and rope_local_theta must not be negative.")


def _require_positive(values: dict[str, int | float]) -> None:
    """Refuse, in one sentence, the first setting that is not positive (integers: at least 1)."""
    for key, value in values.items():
        if value < 1 if isinstance(value, int) else value <= 0:
            raise UserInputError(f"{key} must be positive, got {value}.")


def _require_non_negative(values: dict[str, int | float]) -> None:
    """Refuse, in one sentence, the first setting below zero."""
    for key, value in values.items():
        if value < 0:
            raise UserInputError(f"{key} must not be negative, got {value}.")


def validate_model(model: ModelConfig) -> None:
    """Raise a `UserInputError` with one sentence if the model's shape cannot be built: checked
    before training, and before a saved model's config.json allocates anything when it loads."""
    _require_positive({"model.block_size": model.block_size, "model.n_layer": model.n_layer, "model.n_head": model.n_head,
                       "model.n_embd": model.n_embd, "model.rope_theta": model.rope_theta, "model.norm_eps": model.norm_eps})
    _require_non_negative({"model.vocab_size": model.vocab_size, "model.n_kv_head": model.n_kv_head, "model.ffn_hidden": model.ffn_hidden})
    if model.n_embd % model.n_head and not model.head_size:
        raise UserInputError(
            f"model.n_head ({model.n_head}) must divide model.n_embd ({model.n_embd}); pick a width that is a multiple of the head count."
        )
    if model.head_dim % 2:
        raise UserInputError(
            f"Each attention head is {model.head_dim} wide, but rotary embeddings need an even head width; change n_embd or n_head."
        )
    if model.n_head % model.kv_heads:
        raise UserInputError(
            f"model.n_kv_head ({model.kv_heads}) must divide model.n_head ({model.n_head}) so query heads share key/value heads evenly."
        )
    if not 0.0 <= model.dropout < 1.0:
        raise UserInputError(f"model.dropout must be in [0, 1), got {model.dropout}.")
    validate_family_switches(model)


def validate(config: RunConfig, tokenizer_vocab_size: int | None = None) -> None:
    """Raise a `UserInputError` with one sentence if the configuration cannot work."""
    model, train = config.model, config.train
    validate_model(model)
    positive = {
        "train.batch_size": train.batch_size,
        "train.gradient_accumulation_steps": train.gradient_accumulation_steps, "train.eval_steps": train.eval_steps,
        "train.eval_batches": train.eval_batches, "train.save_steps": train.save_steps,
        "train.keep_checkpoints": train.keep_checkpoints, "train.log_steps": train.log_steps,
        "train.learning_rate": train.learning_rate, "train.dpo_beta": train.dpo_beta,
    }
    _require_positive(positive)
    non_negative = {
        "train.max_data_size": train.max_data_size, "train.shuffle_buffer": train.shuffle_buffer,
        "train.tokenizer_samples": train.tokenizer_samples, "train.min_learning_rate": train.min_learning_rate,
        "train.warmup_steps": train.warmup_steps, "train.weight_decay": train.weight_decay,
        "train.grad_clip": train.grad_clip, "train.max_steps": train.max_steps, "train.max_time": train.max_time,
        "train.early_stopping_patience": train.early_stopping_patience, "train.sample_tokens": train.sample_tokens,
        "train.max_cpu": train.max_cpu, "train.max_memory": train.max_memory, "train.num_threads": train.num_threads,
        "train.lora_rank": train.lora_rank, "train.lm_loss_weight": train.lm_loss_weight,
        "train.num_epochs": train.num_epochs, "train.epoch_steps": train.epoch_steps, "train.rpo_alpha": train.rpo_alpha,
        "train.min_epochs": train.min_epochs,
    }
    _require_non_negative(non_negative)
    if not 0.0 <= train.val_fraction < 1.0:
        raise UserInputError(f"train.val_fraction must be in [0, 1), got {train.val_fraction}.")
    if train.min_learning_rate > train.learning_rate:
        raise UserInputError(
            f"The minimum learning rate ({train.min_learning_rate}) is above the learning rate ({train.learning_rate}); "
            "lower --min-learning-rate, or leave it out to decay to --min-lr-ratio of the peak."
        )
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        raise UserInputError(f"train.min_lr_ratio is a fraction of the peak learning rate; give a value from 0 to 1, got {train.min_lr_ratio}.")
    if not 0.0 <= train.warmup_ratio < 1.0:
        raise UserInputError(f"train.warmup_ratio is a fraction of the run; give a value in [0, 1), got {train.warmup_ratio}.")
    if not (0.0 <= train.beta1 < 1.0 and 0.0 <= train.beta2 < 1.0):
        raise UserInputError("train.beta1 and train.beta2 must be in [0, 1).")
    for key in ("max_cpu", "max_memory"):
        if getattr(train, key) > 100:
            raise UserInputError(f"train.{key} is a percentage of the machine; give a value up to 100, got {getattr(train, key)}.")
    if train.dataloader_workers < -1:
        raise UserInputError(f"train.dataloader_workers must be -1 (auto), 0 or more, got {train.dataloader_workers}.")
    if train.max_steps == 0 and train.max_time == 0 and train.num_epochs == 0:
        raise UserInputError("Give the run an end: set max_steps, num_epochs or max_time above 0.")
    if train.num_epochs and train.overfit_batch:
        raise UserInputError("--num-epochs counts passes over the data, and --overfit-batch trains on one batch: give --max-steps instead.")
    if train.warmup_ratio and not (train.max_steps or train.num_epochs):
        raise UserInputError("--warmup-ratio is a fraction of the run's steps, and this run is bounded by --max-time alone: "
                             "give --max-steps or --num-epochs, or the warmup as --warmup-steps.")
    if "epoch" in (train.eval_strategy, train.save_strategy) and not train.num_epochs:
        raise UserInputError("--eval-strategy/--save-strategy epoch act at the end of each epoch; give --num-epochs too.")
    for key, allowed in CHOICES.items():
        value = getattr(train, key.split(".")[1])
        if value not in allowed:
            raise UserInputError(f"{key} must be one of {', '.join(allowed)}, got '{value}'.")
    if train.tokenizer_type == "bpe" and train.tokenizer_vocab_size < 260:
        raise UserInputError(
            f"A byte-level BPE vocabulary needs at least 260 tokens (256 bytes + 4 special), got {train.tokenizer_vocab_size}."
        )
    if tokenizer_vocab_size is not None and model.vocab_size and model.vocab_size < tokenizer_vocab_size:
        raise UserInputError(
            f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's vocabulary ({tokenizer_vocab_size}); "
            "set it to 0 to follow the tokenizer."
        )
