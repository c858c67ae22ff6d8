"""Setting up a training run: its directory, tokenizer, data streams, model and objective.

`prepare_run(config)` does everything between "here is a configuration" and "start the loop",
and checks every input first, so a mistake (a missing file, an impossible configuration, a run
that already exists) is reported before any work is done or any file is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import torch

from minigpt.checkpoint import latest_checkpoint, latest_intact_checkpoint
from minigpt.config import ModelConfig, RunConfig, apply_overrides, validate
from minigpt.distributed import (
    broadcast_from_main, compute_init, cores_per_process, is_main_process, main_process_first, process_place,
)
from minigpt.errors import UserInputError
from minigpt.files import atomic_write_json, check_plain_name, lock_run_directory, remove_temporary_files, unlock_run_directory
from minigpt.lora import LoRAConfig, apply_lora, count_trainable, format_trainable, parse_targets, store_frozen_base
from minigpt.memory import (
    MemoryEstimate, choose_micro_batch, device_memory, dry_run_report, estimate_memory, probe_fits, process_memory, resize_stream,
    time_micro_step, time_optimizer_step,
)
from minigpt.metrics import truncate_metrics
from minigpt.model import GPT
from minigpt.model_folder import AdapterRun, load_language_model
from minigpt.objective import Objective
from minigpt.optim import build_optimizer
from minigpt.runtime import (
    PROBE_TOKENS, available_cpu_cores, configure_threads, fastest_cpu_dtype, keep_freed_memory_for_reuse, select_device,
    select_dtype, seed_everything,
)
from minigpt.run_log import RunLog
from minigpt.sinks import TensorBoardCallback, WandbCallback
from minigpt.sources import iter_documents, resolve_data_files, sources_fingerprint
from minigpt.stages import Stage, check_stage_settings, stage_of
from minigpt.tokenizer import CJK_SHARE_FOR_CHARACTERS, Tokenizer, choose_tokenizer_type, load_tokenizer, train_tokenizer
from minigpt.trainer import Callback, LossPlotCallback, Trainer

log = logging.getLogger("minigpt.run")

FULL_DATA_DIRECTORY = "data"


@dataclass
class RunPaths:
    run_dir: Path
    resume_from: Path | None  # the checkpoint to continue from, if resuming


def training_sources(config: RunConfig, stage: Stage) -> tuple[RunConfig, list]:
    """The configuration and the training sources: --data-files, every file under data/
    (--use-full-data), or the stage's built-in set."""
    train = config.train
    if train.use_full_data and train.data_files:
        raise UserInputError("Give either --data-files or --use-full-data, not both.")
    if train.use_full_data:
        if not Path(FULL_DATA_DIRECTORY).is_dir():
            raise UserInputError(f"--use-full-data reads every .jsonl/.txt file under ./{FULL_DATA_DIRECTORY}/, which does not exist.")
        return config, resolve_data_files([FULL_DATA_DIRECTORY])
    if train.data_files:
        return config, resolve_data_files(train.data_files, builtin=stage.reads_builtin_text)
    return stage.builtin_sources(config)


# What makes two models the same network: weights of one fit the other only if these agree.
ARCHITECTURE = ("vocab_size", "n_layer", "n_head", "kv_heads", "n_embd", "hidden_dim", "tie_embeddings", "rope_theta", "norm_eps",
                "family", "head_dim", "attention_bias", "qk_norm", "norm_unit_offset", "sandwich_norms", "mlp_activation",
                "scale_embeddings", "query_pre_attn_scalar", "rope_scaling", "sliding_window", "layer_types", "rope_local_theta")


def initial_model_config(path: str) -> ModelConfig:
    """The model settings of the model --init-from names: a run started from it takes its shape."""
    return load_language_model(path).config.model


# The sequence length a run started from a pretrained folder trains on unless --block-size says
# otherwise: its max_position_embeddings (32k-128k) is the longest text it can read, not a length
# to fine-tune at (a batch of 32k-token rows would not fit a laptop, and chat data is far shorter).
FINE_TUNING_BLOCK_SIZE = 512


def fine_tuning_model_config(initial: ModelConfig, block_size_given: bool) -> ModelConfig:
    """The model settings of a run started from `initial`: its shape, and for a pretrained folder
    (not a MiniGPT model, whose block size its own run chose) sequences of at most
    FINE_TUNING_BLOCK_SIZE tokens unless the user gave --block-size."""
    if block_size_given or initial.family == "minigpt" or initial.block_size <= FINE_TUNING_BLOCK_SIZE:
        return initial
    log.info("Training on sequences of %d tokens (the model reads up to %d); --block-size changes it.",
             FINE_TUNING_BLOCK_SIZE, initial.block_size)
    return dataclasses.replace(initial, block_size=FINE_TUNING_BLOCK_SIZE)


def check_initial_model(config: RunConfig, initial: ModelConfig) -> None:
    """Refuse, in one sentence, a configuration whose network differs from the initial model's."""
    for name in ARCHITECTURE:
        wanted, given = getattr(config.model, name), getattr(initial, name)
        if wanted != given:
            raise UserInputError(
                f"--init-from {config.train.init_from} has model.{name} = {given}, but this run asks for {wanted}; "
                "leave the model settings out (they come from the initial model)."
            )
    if config.train.tokenizer_path:
        raise UserInputError("--tokenizer cannot be combined with --init-from: the initial model's tokenizer is used "
                             "(its token ids are what the model's embeddings mean).")


def resolve_run_paths(config: RunConfig) -> RunPaths:
    """Where the run lives, and which checkpoint it resumes from.

    --resume alone continues the latest checkpoint of the run named by --run-name (or of the most
    recent run under the output directory); --resume DIR continues that checkpoint directory.
    """
    train = config.train
    check_plain_name(train.run_name, "--run-name")
    output_dir = Path(train.output_dir)
    if train.resume and train.resume != "latest":
        checkpoint = Path(train.resume)
        if not (checkpoint / "model.safetensors").is_file():
            raise UserInputError(f"--resume {checkpoint} is not a checkpoint directory (no model.safetensors in it).")
        return RunPaths(checkpoint.parent, checkpoint)
    if train.resume:
        if train.run_name:
            run_dir = output_dir / train.run_name
        else:
            runs = [entry for entry in output_dir.glob("*/config.json")] if output_dir.is_dir() else []
            if not runs:
                raise UserInputError(f"--resume found no run under {output_dir}; name one with --run-name.")
            run_dir = max(runs, key=lambda path: path.stat().st_mtime).parent
        checkpoint = latest_intact_checkpoint(run_dir)
        if checkpoint is None and latest_checkpoint(run_dir) is not None:
            raise only_damaged_checkpoints(run_dir)
        if checkpoint is None:
            raise UserInputError(f"--resume: run {run_dir} has no checkpoint yet; start it again without --resume.")
        return RunPaths(run_dir, checkpoint)
    name = train.run_name or f"{config.preset or 'custom'}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = output_dir / name
    if latest_checkpoint(run_dir) is not None and not (run_dir / "final_model").exists() and latest_intact_checkpoint(run_dir) is None:
        raise only_damaged_checkpoints(run_dir)
    if latest_checkpoint(run_dir) is not None or (run_dir / "final_model").exists():
        raise UserInputError(
            f"Run directory {run_dir} already holds a run; continue it with --resume or choose another --run-name."
        )
    return RunPaths(run_dir, None)


def only_damaged_checkpoints(run_dir: Path) -> UserInputError:
    """The one way out of a run whose checkpoints are all damaged, said alike whether or not
    --resume was asked: nothing there can be continued, and the directory is not deleted for the user."""
    return UserInputError(
        f"Run {run_dir} holds only damaged checkpoints (files that differ from their manifest.json, newest "
        f"{latest_checkpoint(run_dir).name}), so it cannot be continued: "
        f"start the run again under another --run-name (delete {run_dir} yourself if you no longer need it)."
    )


def _tokenizer_key(sources: list, config: RunConfig) -> str:
    """A key that changes when the tokenizer's training input or settings change."""
    train = config.train
    key = [sources_fingerprint(sources), train.tokenizer_type, train.tokenizer_vocab_size, train.tokenizer_samples, train.text_field]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]


def resolve_tokenizer_type(config: RunConfig, sources: list) -> RunConfig:
    """The configuration with tokenizer type "auto" decided by the training texts' script
    (tokenizer.choose_tokenizer_type), said in the log with the share measured; config.json then
    records the type trained."""
    train = config.train
    if train.tokenizer_type != "auto" or train.tokenizer_path:
        return config
    kind, share = choose_tokenizer_type(iter_documents(sources, text_field=train.text_field))
    if kind == "char":
        log.info("Tokenizer: %.0f%% of the training text's characters are Chinese, Japanese or Korean (at least %.0f%%), "
                 "so each character is a token (tokenizer type auto; --tokenizer-type bpe overrides)", 100 * share,
                 100 * CJK_SHARE_FOR_CHARACTERS)
    else:
        log.info("Tokenizer: %.0f%% of the training text's characters are Chinese, Japanese or Korean (under %.0f%%), "
                 "so byte-level BPE (tokenizer type auto; --tokenizer-type char overrides)", 100 * share, 100 * CJK_SHARE_FOR_CHARACTERS)
    return dataclasses.replace(config, train=dataclasses.replace(train, tokenizer_type=kind))


def obtain_tokenizer(config: RunConfig, sources: list, show_progress: bool = True) -> Tokenizer:
    """The --tokenizer file if given; else the tokenizer trained before on the same sources and settings, or a new one."""
    train = config.train
    if train.tokenizer_path:
        return load_tokenizer(train.tokenizer_path)
    cache = Path(train.output_dir) / "tokenizers" / (
        f"{train.tokenizer_type}-{train.tokenizer_vocab_size}-{_tokenizer_key(sources, config)}.json"
    )
    if cache.is_file() and not train.retrain_tokenizer:
        log.info("Reusing tokenizer %s", cache)
        return load_tokenizer(cache)
    size = f" (vocabulary {train.tokenizer_vocab_size})" if train.tokenizer_type == "bpe" else ""  # a char vocabulary is what the text holds
    log.info("Training a %s tokenizer%s on %s", train.tokenizer_type, size, ", ".join(map(str, sources)))
    texts = iter_documents(sources, text_field=train.text_field)
    tokenizer = train_tokenizer(train.tokenizer_type, texts, train.tokenizer_vocab_size, train.tokenizer_samples, show_progress)
    tokenizer.save(cache)
    log.info("Saved tokenizer %s", cache)
    return tokenizer


def describe_global_batch(config: RunConfig, processes: int) -> str:
    """The tokens one optimizer step learns from: micro-batch x accumulation x processes."""
    train, block = config.train, config.model.block_size
    tokens = train.batch_size * block * train.gradient_accumulation_steps * processes
    return (f"{train.batch_size} sequences x {block} tokens x {train.gradient_accumulation_steps} micro-batch(es) "
            f"x {processes} process(es) = {tokens:,} tokens per step")


def resolve_run_length(config: RunConfig, stage: Stage, train_stream: object, processes: int) -> RunConfig:
    """The configuration with the run's length worked out in steps, as config.json records it (so
    a resumed run continues the same schedule), each resolution said in the log:

        epoch_steps   optimizer steps in one epoch (one pass over the training data): the rows of
                      a pass (counted once, `sequences_per_pass`) over the global batch, rounded
                      up. Counted when the run has num_epochs, or when it is free (the stage's
                      `epochs_cost_nothing`: a classifier's records are in memory); a text corpus
                      without num_epochs is not read an extra time just to report epochs. A
                      recorded number is kept.
        max_steps     with num_epochs: ceil(num_epochs x epoch_steps), or the max_steps given
                      with it if that is fewer; with min_epochs, at least ceil(min_epochs x
                      epoch_steps). The schedule decays over these steps.
        warmup_steps  with warmup_ratio: round(warmup_ratio x max_steps); warmup_ratio becomes 0.

    `processes` is the number of processes under torchrun (each reads its share of every global batch).
    """
    train = config.train
    epoch_steps = train.epoch_steps
    sequences = train.batch_size * train.gradient_accumulation_steps * processes
    if not epoch_steps and (train.num_epochs or train.min_epochs or stage.epochs_cost_nothing):
        rows = train_stream.sequences_per_pass()
        epoch_steps = max(1, math.ceil(rows / sequences))
        log.info("1 epoch = %s steps of %s sequences (%s rows of training data)", f"{epoch_steps:,}", f"{sequences:,}", f"{rows:,}")
    max_steps = train.max_steps
    if train.num_epochs:
        epochs_long = math.ceil(train.num_epochs * epoch_steps)
        max_steps = min(max_steps, epochs_long) if max_steps else epochs_long
        capped = f" (capped by max_steps {train.max_steps:,})" if max_steps < epochs_long else ""
        log.info("%g epoch(s) = %s steps%s", train.num_epochs, f"{max_steps:,}", capped)
    if train.min_epochs and max_steps and max_steps < (at_least := math.ceil(train.min_epochs * epoch_steps)):
        log.info("%s steps are %.2g epochs of this data: raised to %s steps, the %g epochs of min_epochs",
                 f"{max_steps:,}", max_steps / epoch_steps, f"{at_least:,}", train.min_epochs)
        max_steps = at_least
    warmup_steps = train.warmup_steps
    if train.warmup_ratio:  # validate() made sure the run has steps to take a fraction of
        warmup_steps = round(train.warmup_ratio * max_steps)
        log.info("Warmup: %g%% of %s steps = %s steps", 100 * train.warmup_ratio, f"{max_steps:,}", f"{warmup_steps:,}")
    elif max_steps and warmup_steps >= max_steps:
        log.warning("The warmup (%s steps) is as long as the run (%s steps): the learning rate never reaches %g. Shorten it "
                    "with --warmup-steps or --warmup-ratio.", f"{warmup_steps:,}", f"{max_steps:,}", train.learning_rate)
    return dataclasses.replace(config, train=dataclasses.replace(
        train, epoch_steps=epoch_steps, max_steps=max_steps, warmup_steps=warmup_steps, warmup_ratio=0.0))


def build_callbacks(config: RunConfig, stage: Stage) -> list[Callback]:
    """Loss plots, the stage's callbacks and the optional TensorBoard / W&B sinks the configuration asks for."""
    train = config.train
    callbacks: list[Callback] = [LossPlotCallback()] if train.plot_loss else []
    callbacks += stage.callbacks(config)
    if train.tensorboard:
        callbacks.append(TensorBoardCallback(config.to_dict(), histogram_steps=train.eval_steps))
    if train.wandb:
        callbacks.append(WandbCallback(config.to_dict(), project=train.wandb_project))
    return callbacks


def check_config(config: RunConfig, given: Mapping[str, str] | None = None, source: str = "the configuration") -> Stage:
    """validate() and the stage's own rules (settings that do not apply to it, combinations it
    cannot train); returns the stage. `given` maps the settings a user set by hand (a flag, a
    form's field) to its name, for minigpt.stages.check_stage_settings."""
    validate(config)
    check_stage_settings(config, given, source)
    if config.train.lora_rank and not config.train.init_from:
        raise UserInputError("LoRA trains small adapters on a frozen, already trained model: give that model with --init-from.")
    if config.train.optimizer == "muon" and (config.train.lora_rank or config.train.freeze_trunk):
        raise UserInputError(f"--optimizer muon trains the transformer blocks' weight matrices, and a run with "
                             f"{'--lora-rank' if config.train.lora_rank else '--freeze-trunk'} trains none of them: use --optimizer adamw.")
    return stage_of(config)


def configure(base: RunConfig, overrides: Mapping[str, Any], given: Mapping[str, str], source: str, resumed: bool = False) -> RunConfig:
    """The configuration of a run: `base` (a preset, a file, the stage's recipe, or a resumed run's
    config.json) with the user's settings on top, checked. The command line and the notebook's
    form both build their configuration here. A new run started from a model (--init-from) takes
    that model's shape; model settings given too still apply, and prepare_run refuses any that
    contradict it."""
    init_from = overrides.get("train.init_from", base.train.init_from)
    if resumed and overrides.get("train.dtype") == "auto":
        # --dtype auto was decided when the run started and recorded; measuring again could choose
        # the other precision, and the resumed run would no longer compute as the interrupted one.
        overrides = {key: value for key, value in overrides.items() if key != "train.dtype"}
        log.info("--dtype auto on a resumed run: keeping the %s the run chose when it started.", base.train.dtype)
    if init_from and not resumed:
        base = dataclasses.replace(base, model=fine_tuning_model_config(initial_model_config(init_from), "model.block_size" in overrides))
    config = apply_overrides(base, overrides, source=source)
    check_config(config, given, source)
    return config


def show_log_lines() -> None:
    """Let MiniGPT's progress lines reach a notebook or script user who configured no logging.

    The command-line tools route the log through the progress bar themselves. A library call
    with no logging set up anywhere would otherwise show only warnings; here it gets the same
    plain INFO lines on stdout. Any handler the user did configure is left alone.
    """
    package = logging.getLogger("minigpt")
    if not package.handlers and not logging.getLogger().handlers:
        handler = StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


class StdoutHandler(logging.StreamHandler):
    """A log handler that writes to whatever sys.stdout is when a line is logged: Jupyter and
    test runners replace sys.stdout, and a handler holding the old one would write nowhere."""

    @property
    def stream(self):  # noqa: ANN201 - the attribute logging.StreamHandler reads and writes
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler.__init__ assigns it; sys.stdout is always used
        pass


def prepare_run(
    config: RunConfig,
    show_progress: bool = True,
    callbacks: list[Callback] | None = None,
    objective: Objective | None = None,
) -> Trainer:
    """Check everything, create the run directory, and return a Trainer ready to `train()`.

    `callbacks` are added to those the configuration asks for (plots, sinks): a notebook or a
    script hooks into the loop this way. `objective` replaces the one the configuration implies.
    Process-wide settings it makes, each said in the log: the CPU threads, the seeds of Python's,
    NumPy's and PyTorch's generators, and (unless --disable-optimizations) glibc's malloc thresholds.
    """
    show_log_lines()
    run_log = RunLog() if is_main_process() else None  # train.log: from here on, written once the run directory exists
    try:
        return _prepare_run(config, show_progress, callbacks, objective, run_log)
    except BaseException:
        if run_log is not None:
            run_log.close()
        raise


def _prepare_run(config: RunConfig, show_progress: bool, callbacks: list[Callback] | None, objective: Objective | None,
                 run_log: RunLog | None) -> Trainer:
    stage = check_config(config)  # the one place the stage is looked up
    place = process_place()
    config, sources = training_sources(config, stage)
    paths = resolve_run_paths(config)
    device = compute_init(select_device(config.train.device), config.train.ddp_backend)  # joins torchrun's processes, if any
    dtype = torch.float32 if config.train.disable_optimizations else select_dtype(config.train.dtype, device)
    threads = configure_threads(config.train.num_threads or cores_per_process(available_cpu_cores()))
    if not config.train.disable_optimizations and keep_freed_memory_for_reuse():
        log.info("Memory: freed blocks stay in this process for the next step (glibc malloc thresholds; "
                 "--disable-optimizations leaves the allocator alone).")
    initial = load_language_model(config.train.init_from) if config.train.init_from else None
    if paths.resume_from is not None:
        tokenizer = load_tokenizer(paths.run_dir / "tokenizer.json")
    elif initial is not None:
        tokenizer = initial.tokenizer
    else:
        config = resolve_tokenizer_type(config, sources)
        with main_process_first():  # rank 0 trains (and caches) the tokenizer, the others then load it
            tokenizer = obtain_tokenizer(config, sources, show_progress and is_main_process())
    if not config.model.vocab_size:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size))
    validate(config, tokenizer.vocab_size)
    if initial is not None:
        check_initial_model(config, initial.config.model)
    elif paths.resume_from is None:
        stage.starting_from_scratch()

    seed_everything(config.train.seed)
    # The data decide what config.json records: the validation split, a classifier's label maps.
    config, train_stream, val_stream = stage.prepare_data(config, sources, tokenizer, device, resumed=paths.resume_from is not None)
    config = resolve_run_length(config, stage, train_stream, place.world_size)
    run_dir = paths.run_dir
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, run_name=run_dir.name, resume=""))
    callbacks = build_callbacks(config, stage) + list(callbacks or [])  # first: a missing sink package is an error
    if objective is None:
        objective = stage.build_objective(config, tokenizer, train_stream)
    model = stage.build_model(config).to(device)
    adapter = None
    if initial is not None:
        stage.start_from(model, initial.model)
        log.info("Starting from %s", config.train.init_from)
    if config.train.lora_rank:
        train = config.train
        adapter = AdapterRun.start(LoRAConfig(train.lora_rank, train.lora_alpha, train.lora_dropout, parse_targets(train.lora_targets)),
                                   train.init_from)
        apply_lora(model, adapter.config)
        stage.after_lora(model)
        log.info("LoRA rank %d on %s: %s", train.lora_rank, ",".join(adapter.config.targets), format_trainable(*count_trainable(model)))
    model.gradient_checkpointing = config.train.gradient_checkpointing
    if config.train.auto_batch_size and paths.resume_from is None:  # a resumed run keeps what config.json recorded
        config = resolve_auto_batch_size(config, model, objective, train_stream, device, dtype)
    if device.type == "cpu" and config.train.dtype == "auto" and not config.train.disable_optimizations:
        sequences = max(1, min(config.train.batch_size, PROBE_TOKENS // config.model.block_size))
        probe_batch = objective.example_batch(sequences, config.model.block_size)
        # Timed, the choice could differ between processes: rank 0's holds for all.
        dtype = broadcast_from_main(fastest_cpu_dtype(model, lambda probe: objective.loss(probe, probe_batch)))
    if adapter is not None and dtype != torch.float32:
        store_frozen_base(model, dtype)  # autocast multiplies the base in this dtype anyway: the same numbers, half the memory
    # Record the precision chosen, so that a resumed run computes exactly as this one did.
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, dtype=str(dtype).replace("torch.", "")))
    if is_main_process():  # under torchrun only rank 0 writes
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_directory(run_dir)  # a second trainer here is refused; Trainer.train() releases it
        remove_temporary_files(run_dir)
        run_log.open(run_dir)
    if place.world_size > 1:
        # Every process built the same model (and DDP copies rank 0's weights to all); from here on
        # each draws its own random numbers, as on a machine of its own: its own dropout masks.
        seed_everything(config.train.seed + place.rank)
    trainer = Trainer(config, model, tokenizer, objective, train_stream, val_stream, run_dir, device, dtype, callbacks, show_progress,
                      adapter=adapter, run_log=run_log)
    try:  # before anything is written: a refused resume (another process or worker count, a changed base) changes nothing
        if paths.resume_from is not None:
            trainer.resume(paths.resume_from)
        stage.before_training(trainer, resumed=paths.resume_from is not None)
    except BaseException:
        unlock_run_directory(run_dir)
        raise
    if is_main_process():
        atomic_write_json(run_dir / "config.json", config.to_dict())
        if paths.resume_from is None:
            tokenizer.save(run_dir / "tokenizer.json")
        else:
            truncate_metrics(run_dir / "metrics.jsonl", trainer.progress.step)
    log.info(
        "Run %s: %s parameters (%s without embeddings), device %s, %s, %d CPU threads, seed %d",
        run_dir, f"{model.num_parameters():,}", f"{model.num_parameters(exclude_embeddings=True):,}", device,
        str(dtype).replace("torch.", ""), threads, config.train.seed,
    )
    log.info("Global batch: %s", describe_global_batch(config, place.world_size))
    return trainer


def resolve_auto_batch_size(config: RunConfig, model: GPT, objective: Objective, train_stream: object, device: torch.device,
                            dtype: torch.dtype) -> RunConfig:
    """--batch-size auto: measure the micro-batch to use (minigpt.memory.choose_micro_batch), point the
    training stream at it, and return the configuration with it (config.json records it, so a
    resumed run trains exactly as this one)."""
    if not resize_stream(train_stream, config.train.batch_size):
        raise UserInputError("--batch-size auto cannot be combined with --overfit-batch (its one batch is fixed); give a number.")
    # Under torchrun rank 0 measures (the others wait) and its choice holds for all: processes that
    # accumulated different numbers of micro-batches would wait for each other's gradients forever.
    choice = broadcast_from_main(choose_micro_batch(model, objective, config, device, dtype) if is_main_process() else None)
    resize_stream(train_stream, choice.micro_batch)
    log.info("Batch size auto: %s.", choice.reason)
    return dataclasses.replace(config, train=dataclasses.replace(
        config.train, batch_size=choice.micro_batch, gradient_accumulation_steps=choice.accumulation))


@dataclass(frozen=True)
class DryRun:
    """What `minigpt train --dry-run` works out before it prints: the configuration (with the
    tokenizer's vocabulary), the objective, where and in what precision the run would compute,
    and the memory estimate of a step."""

    config: RunConfig
    stage: Stage
    objective: Objective
    device: torch.device
    dtype: torch.dtype
    estimate: MemoryEstimate


def dry_run_model(config: RunConfig, stage: Stage, on: torch.device) -> GPT:
    """The model a run of `config` trains (LoRA applied, checkpointing set), built on `on`: on the
    meta device its parameters have shapes and no data, so an estimate costs no memory."""
    with on:
        model = stage.build_model(config)
    train = config.train
    if train.lora_rank:
        apply_lora(model, LoRAConfig(train.lora_rank, train.lora_alpha, train.lora_dropout, parse_targets(train.lora_targets)))
        stage.after_lora(model)
    model.gradient_checkpointing = train.gradient_checkpointing
    return model


def plan_dry_run(config: RunConfig) -> DryRun:
    """The estimate `dry_run` prints, without the probe. The tokenizer comes from where the run would
    take it (--tokenizer, --init-from, the resumed run, or the tokenizer cache, where a missing one is
    trained once and kept for the real run). The data are prepared as the run prepares them (a
    classifier's heads need its label maps) and, off CUDA, the first training batch is read and
    dropped, so the process measured holds a data reader as the run's will (text is read where
    the run would read a token cache: a dry-run builds none). On a CPU, --dtype auto is taken as
    float32 here (the run itself measures whether bfloat16 pays)."""
    stage = check_config(config)
    train = config.train
    device = select_device(train.device)
    dtype = torch.float32 if train.disable_optimizations else select_dtype(train.dtype, device)
    config, sources = training_sources(config, stage)
    if train.resume:
        tokenizer = load_tokenizer(resolve_run_paths(config).run_dir / "tokenizer.json")
    elif train.init_from:
        tokenizer = load_language_model(train.init_from).tokenizer
    else:
        config = resolve_tokenizer_type(config, sources)
        tokenizer = obtain_tokenizer(config, sources, show_progress=False)
    if not config.model.vocab_size:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size))
    validate(config, tokenizer.vocab_size)
    configure_threads(train.num_threads or cores_per_process(available_cpu_cores()))  # as the run will: threads take memory too
    if not train.disable_optimizations:
        keep_freed_memory_for_reuse()
    text = dataclasses.replace(config, train=dataclasses.replace(config.train, token_cache=False, overfit_batch=False, dataloader_workers=0))
    prepared, train_stream, _ = stage.prepare_data(text, sources, tokenizer, torch.device("cpu"), resumed=bool(train.resume))
    config = dataclasses.replace(prepared, train=dataclasses.replace(
        prepared.train, token_cache=train.token_cache, overfit_batch=train.overfit_batch, dataloader_workers=train.dataloader_workers))
    if device.type != "cuda":
        next(iter(train_stream))
    objective = stage.build_objective(config, tokenizer, train_stream)
    model = dry_run_model(config, stage, torch.device("meta"))
    if train.lora_rank and dtype != torch.float32:
        store_frozen_base(model, dtype)  # as the run will
    estimate = estimate_memory(model, config, train.batch_size * objective.rows_per_example, dtype, device,
                               process=process_memory(device, dtype))
    return DryRun(config, stage, objective, device, dtype, estimate)


def dry_run(config: RunConfig, probe: bool = True) -> str:
    """`minigpt train --dry-run`: the memory a run of this configuration needs, against what the
    device has, and (with `probe`) its step time from one timed micro-step; no run directory is
    made and nothing is trained. The model is built on the meta device for the estimate, and for
    real only for the probe, and only if the estimate says it fits."""
    plan = plan_dry_run(config)
    config, train = plan.config, plan.config.train
    budget = device_memory(plan.device, train.max_memory)
    micro_seconds = optimizer_seconds = None
    if probe and probe_fits(plan.estimate, budget, train.gradient_checkpointing):
        seed_everything(train.seed)
        model = dry_run_model(config, plan.stage, plan.device)
        micro_seconds = time_micro_step(model, plan.objective, train.batch_size, config.model.block_size, plan.device, plan.dtype)
        optimizer_seconds = time_optimizer_step(build_optimizer(model, train, plan.device.type), model, plan.device)
    return dry_run_report(plan.estimate, config, budget, micro_seconds, optimizer_seconds)
