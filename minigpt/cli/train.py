"""`minigpt train`: train a model (from a preset, a config file and flags)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
from typing import Any, NamedTuple

from minigpt.cli.common import SHARED_ARGUMENTS, ArgumentParser, dash_spellings, program_name, run_command
from minigpt.distributed import compute_cleanup
from minigpt.config import CHOICES, PRESETS, RunConfig, apply_overrides, load_config
from minigpt.errors import UserInputError
from minigpt.report import record_session, write_report
from minigpt.run import configure, dry_run, prepare_run, resolve_run_paths
from minigpt.stages import STAGES, stage_named

log = logging.getLogger("minigpt.train")

DEFAULT_CONFIG = "medium"


class Flag(NamedTuple):
    names: tuple[str, ...]  # the first is the one --help shows first; the others are aliases
    key: str  # the configuration setting it sets, e.g. "train.learning_rate"
    help: str = ""  # empty: the shared help of `SHARED_ARGUMENTS`


# --help's groups, and in each the flags. Every flag lands in the configuration, nothing else;
# its type, choices and default come from the configuration itself.
FLAGS: dict[str, list[Flag]] = {
    "fine-tuning": [
        Flag(("--stage",), "train.stage", "; ".join(f"{name}: {stage.help}" for name, stage in STAGES.items())),
        Flag(("--init-from", "--model-name-or-path"), "train.init_from", "start from this language model (final_model/, a LoRA run's adapter, checkpoint, run or Hugging Face Llama, Qwen2, Qwen3 or Gemma 3 folder); its shape and tokenizer are used"),
        Flag(("--lora-rank",), "train.lora_rank", "train LoRA adapters of this rank on the frozen --init-from model (0 = train every weight)"),
        Flag(("--lora-alpha",), "train.lora_alpha", "the adapters' update is scaled by alpha / rank"),
        Flag(("--lora-dropout",), "train.lora_dropout", "dropout on the adapters' input"),
        Flag(("--lora-targets",), "train.lora_targets", "the layers that get adapters: any of q,k,v,o,gate,up,down, or all"),
        Flag(("--sample-prompt",), "train.sample_prompt", "sft: the message the model answers as the sample at each evaluation"),
        Flag(("--packing",), "train.packing", "sft: on lays several whole conversations in each row, each attending only to itself "
             "with positions restarting (more assistant tokens per step); off, one conversation per row, padded. "
             "A resumed run keeps the layout it started with"),
    ],
    "preference tuning (--stage dpo)": [
        Flag(("--dpo-beta",), "train.dpo_beta", "DPO's beta: a reply's reward is beta x log(pi / pi_ref); smaller lets the model move further from the reference"),
        Flag(("--rpo-alpha",), "train.rpo_alpha", "add this times the chosen reply's mean negative log-likelihood per token to the loss (RPO; 0 = pure DPO; 1 keeps the chosen replies likely)"),
        Flag(("--ref-model",), "train.ref_model", "the reference model (default: the --init-from model); it must share the tokenizer"),
    ],
    "classification (--stage classify, or the train-classifier command)": [
        Flag(("--tasks",), "train.tasks", "comma-separated tasks to train (default: every <task>_labels field of the data)"),
        Flag(("--task-weights",), "train.task_weights", "each task's loss weight, e.g. sentiment=1,toxicity=0.5 (default 1 each)"),
        Flag(("--class-weights",), "train.class_weights", "balanced: weigh classes inversely to their frequency in the training data"),
        Flag(("--pooling",), "train.pooling", "last: the last real token's vector feeds the heads; mean: the average over real tokens; max: each feature's largest value over them"),
        Flag(("--freeze-trunk",), "train.freeze_trunk", "train only the heads on the frozen --init-from model (a linear probe)"),
        Flag(("--lm-loss-weight",), "train.lm_loss_weight", "add this times the next-token loss on the texts to the classification loss (0 = off)"),
        Flag(("--group-by-length",), "train.group_by_length", "on: batch texts of about one length together (less padding, about twice the "
             "steps per second; the batches' mix of texts changes, which cost 0.015 macro-F1 on the built-in set); auto: on for a set of "
             "more than 5,000 texts. A resumed run keeps what it started with"),
    ],
    "data": [
        Flag(("--data-files", "--train-file"), "train.data_files", "training data: .jsonl/.txt files, directories or globs (none: the built-in corpus)"),
        Flag(("--val-data-files", "--validation-file"), "train.val_data_files", "validation data (none: a hold-out of the training data)"),
        Flag(("--val-fraction",), "train.val_fraction", "share of documents held out for validation when no --val-data-files"),
        Flag(("--use-full-data",), "train.use_full_data", "train on every .jsonl/.txt file under ./data/"),
        Flag(("--max-data-size",), "train.max_data_size", "train on at most this many documents (0 = all)"),
        Flag(("--text-field",), "train.text_field"),
        Flag(("--token-cache",), "train.token_cache", "tokenize the data once into <output-dir>/token_cache/ (reused while the files and tokenizer stay the same)"),
        Flag(("--tokenizer",), "train.tokenizer_path", "use this tokenizer.json instead of training one"),
        Flag(("--tokenizer-type",), "train.tokenizer_type", "the kind of tokenizer to train (auto: characters for Chinese, Japanese or Korean text, else BPE)"),
        Flag(("--vocab-size", "--tokenizer-vocab-size"), "train.tokenizer_vocab_size", "BPE vocabulary size, special tokens included"),
        Flag(("--tokenizer-samples",), "train.tokenizer_samples", "documents used to train the tokenizer (0 = all)"),
        Flag(("--retrain-tokenizer",), "train.retrain_tokenizer", "train a new tokenizer even if one is cached"),
    ],
    "model": [
        Flag(("--block-size",), "model.block_size", "context length in tokens (from a pretrained folder: 512, or its context if shorter)"),
    ],
    "optimisation": [
        Flag(("--optimizer",), "train.optimizer", "adamw, or muon: Muon for the transformer blocks' matrices and AdamW for "
             "the rest, at the same learning rate and weight decay (kept by --resume)"),
        Flag(("--learning-rate", "--lr"), "train.learning_rate", "peak learning rate"),
        Flag(("--weight-decay",), "train.weight_decay", "weight decay for the matrices"),
        Flag(("--adam-beta1",), "train.beta1", "AdamW's decay rate of the gradient's running average"),
        Flag(("--adam-beta2",), "train.beta2", "AdamW's decay rate of the squared gradient's running average"),
        Flag(("--grad-clip", "--max-grad-norm"), "train.grad_clip", "clip the gradient norm to this (0 = off)"),
        Flag(("--batch-size", "--per-device-train-batch-size"), "train.batch_size", "sequences per micro-batch, or auto: the largest that fits and pays, "
             "with the accumulation raised to keep the global batch (batch size x accumulation); chosen when a run "
             "starts, kept by --resume"),
        Flag(("--gradient-accumulation-steps",), "train.gradient_accumulation_steps", "micro-batches per optimizer step"),
    ],
    "schedule": [
        Flag(("--max-steps",), "train.max_steps", "optimizer steps to train for (0 = until --max-time or the epochs end)"),
        Flag(("--num-epochs", "--num-train-epochs"), "train.num_epochs", "passes over the training data (fractions allowed); "
             "replaces the preset's step count, while an explicit --max-steps or --max-time still ends the run first"),
        Flag(("--max-time",), "train.max_time", "wall-clock budget in seconds: stop, evaluate and save when it runs out (0 = none)"),
        Flag(("--lr-scheduler", "--lr-scheduler-type"), "train.lr_scheduler", "the learning rate's shape after the warmup"),
        Flag(("--warmup-steps",), "train.warmup_steps", "steps of linear warmup"),
        Flag(("--warmup-ratio",), "train.warmup_ratio", "warmup as a fraction of the run's steps instead of --warmup-steps"),
        Flag(("--min-lr-ratio",), "train.min_lr_ratio", "the decay ends at this fraction of the peak learning rate"),
        Flag(("--min-learning-rate",), "train.min_learning_rate", "an absolute learning rate for the end of the decay instead (0 = use --min-lr-ratio)"),
        Flag(("--early-stopping-patience",), "train.early_stopping_patience", "stop after this many evaluations without improvement (0 = off)"),
    ],
    "checkpoints": [
        Flag(("--output-dir",), "train.output_dir"),
        Flag(("--run-name",), "train.run_name", "name of this run's directory (empty: <preset>-<date>-<time>)"),
        Flag(("--save-steps",), "train.save_steps", "save a checkpoint every this many steps"),
        Flag(("--save-strategy",), "train.save_strategy", "steps: save every --save-steps; epoch: at the end of each epoch"),
        Flag(("--keep-checkpoints", "--save-total-limit"), "train.keep_checkpoints", "checkpoints kept (the best by validation loss is always kept too)"),
    ],
    "runtime": [
        Flag(("--device",), "train.device"),
        Flag(("--dtype",), "train.dtype"),
        Flag(("--seed",), "train.seed"),
        Flag(("--num-threads",), "train.num_threads", "CPU threads (0 = the physical cores available to the process)"),
        Flag(("--ddp-backend",), "train.ddp_backend", "under torchrun: how processes exchange gradients (auto: nccl on CUDA, gloo on the CPU)"),
        Flag(("--dataloader-workers", "--dataloader-num-workers"), "train.dataloader_workers", "processes that read and tokenize data (-1 = auto: up to 4 on CUDA, 0 elsewhere)"),
        Flag(("--enable-compile", "--torch-compile"), "train.compile", "torch.compile the model (slow first step, faster after)"),
        Flag(("--compile-mode",), "train.compile_mode", "torch.compile mode with --enable-compile (auto: max-autotune on CUDA, default elsewhere)"),
        Flag(("--gradient-checkpointing",), "train.gradient_checkpointing", "recompute each block's activations in the backward pass: much less memory, about a third more compute"),
        Flag(("--disable-optimizations",), "train.disable_optimizations", "eager float32, plain AdamW, math attention: every optimisation off, for debugging"),
        Flag(("--max-cpu",), "train.max_cpu", "hold this process at or below PERCENT of the machine's CPU (0 = no limit)"),
        Flag(("--max-memory",), "train.max_memory", "save and stop cleanly if system memory stays above PERCENT (0 = no limit)"),
    ],
    "monitoring": [
        Flag(("--eval-steps",), "train.eval_steps", "evaluate every this many steps"),
        Flag(("--eval-strategy", "--evaluation-strategy"), "train.eval_strategy", "steps: evaluate every --eval-steps; epoch: at the end of each epoch"),
        Flag(("--eval-batches",), "train.eval_batches", "validation batches per evaluation"),
        Flag(("--log-steps", "--logging-steps"), "train.log_steps", "log every this many steps"),
        Flag(("--sample-tokens",), "train.sample_tokens", "tokens generated as a sample at each evaluation (0 = none)"),
        Flag(("--plot-loss",), "train.plot_loss", "save loss-curve PNGs under plots/ at every checkpoint and at the end"),
        Flag(("--report",), "train.report", "write the run's report card (report.md, report.html) when it ends, as `minigpt report` does"),
        Flag(("--disable-monitoring",), "train.disable_monitoring", "no CPU/memory sampling or anomaly checks (the --max-cpu/--max-memory limits still hold)"),
        Flag(("--overfit-batch",), "train.overfit_batch", "train on one fixed batch: the loss must fall to about 0"),
        Flag(("--profile",), "train.profile", "print where the step time goes (data, forward, backward, optimizer) after a few steps"),
        Flag(("--tensorboard",), "train.tensorboard", "also write TensorBoard event files (needs the 'tensorboard' extra)"),
        Flag(("--wandb",), "train.wandb", "also log to Weights & Biases, offline unless WANDB_MODE=online (needs the 'wandb' extra)"),
        Flag(("--wandb-project",), "train.wandb_project", "the W&B project to log to (implies --wandb; the run's name there is --run-name)"),
    ],
}

EXIT_STATUSES = """exit status:
  0        the run finished (max steps, time budget or early stopping)
  1        the run failed: NaN/Inf losses, the --max-memory limit or out of memory at a micro-batch of 1
           (a checkpoint is saved), or a full disk (the partial write is removed, the last checkpoint
           kept: free space and --resume)
  2        bad command line, configuration or data (nothing is written)
  130/143  stopped by Ctrl-C / SIGTERM after saving a checkpoint: continue with --resume"""


def setting(config: RunConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def flag_options(flag: Flag, defaults: RunConfig) -> dict[str, Any]:
    """argparse settings for a flag: the type, choices and shown default follow the configuration."""
    field = flag.key.partition(".")[2]
    default = setting(defaults, flag.key)
    shared = SHARED_ARGUMENTS.get(field, ((), {}))[1]
    help_text = flag.help or shared["help"]
    if default not in ("", []):
        help_text += f" (default: {str(default).lower() if isinstance(default, bool) else default})"
    options: dict[str, Any] = dict(dest=field, default=None, help=help_text)  # None: not given, the configuration decides
    if isinstance(default, bool):
        options["action"] = argparse.BooleanOptionalAction  # --plot-loss / --no-plot-loss
    elif isinstance(default, list):
        options.update(nargs="+", metavar="PATH")
    else:
        metavar = {int: "N", float: "X"}.get(type(default), shared.get("metavar"))
        choices = list(STAGES) if flag.key == "train.stage" else CHOICES.get(flag.key)  # the stage registry decides the stages
        options.update(type=type(default), choices=choices, metavar=metavar)
    if flag.key == "train.batch_size":
        options.update(type=batch_size_argument, metavar="N|auto")
    return options


def batch_size_argument(text: str) -> int | str:
    """--batch-size: a number, or "auto" (config_from_arguments turns it into train.auto_batch_size)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got '{text}'") from None


# Flags of Hugging Face's Trainer (and its example scripts) that mean nothing here: each is refused
# with the nearest MiniGPT flag, instead of argparse's bare "unrecognized arguments". Flags that do
# mean the same are read as MiniGPT's (the aliases in FLAGS, --fp16/--bf16, --resume-from-checkpoint).
HUGGING_FACE_ONLY_FLAGS = {
    "--do-train": "minigpt train always trains; leave it out",
    "--do-eval": "evaluation runs every --eval-steps (or each epoch with --eval-strategy epoch)",
    "--do-predict": "use minigpt generate or minigpt evaluate on the trained model",
    "--per-device-eval-batch-size": "evaluation uses the training --batch-size; --eval-batches sets how many batches",
    "--eval-accumulation-steps": "evaluation sums its batches already; --eval-batches sets how many",
    "--logging-dir": "train.log and metrics.jsonl are written to the run directory under --output-dir",
    "--logging-strategy": "--log-steps sets how often a line is logged",
    "--logging-first-step": "--log-steps sets how often a line is logged",
    "--report-to": "use --wandb or --tensorboard",
    "--overwrite-output-dir": "a run directory is never overwritten; choose another --run-name",
    "--push-to-hub": "export the trained model with minigpt export",
    "--load-best-model-at-end": "the best checkpoint is always kept (--keep-checkpoints keeps the newest besides it)",
    "--metric-for-best-model": "each stage has its own metric (validation loss; macro-F1 for classify)",
    "--greater-is-better": "each stage has its own metric (validation loss; macro-F1 for classify)",
    "--optim": "choose with --optimizer adamw or muon (and --weight-decay, --adam-beta1, --adam-beta2)",
    "--adam-epsilon": "AdamW's epsilon is fixed at PyTorch's default",
    "--tf32": "--dtype chooses the precision",
    "--use-cpu": "use --device cpu",
    "--no-cuda": "use --device cpu",
    "--auto-find-batch-size": "use --batch-size auto",
    "--data-seed": "--seed sets the data order too",
    "--label-smoothing-factor": "the loss is plain cross-entropy",
    "--deepspeed": "several processes train through torchrun (DDP)",
    "--fsdp": "several processes train through torchrun (DDP)",
    "--local-rank": "torchrun sets each process's place itself",
    "--save-safetensors": "checkpoints are always safetensors",
    "--remove-unused-columns": "each stage reads the fields it needs",
}


def refuse_hugging_face_only_flags(argv: list[str]) -> None:
    for argument in argv:
        if argument == "--":
            return
        name = dash_spellings([argument.partition("=")[0]])[0]
        if name in HUGGING_FACE_ONLY_FLAGS:
            raise UserInputError(f"{argument.partition('=')[0]} is a Hugging Face Trainer flag with no meaning here: "
                                 f"{HUGGING_FACE_ONLY_FLAGS[name]}.")


def base_config(argv: list[str]) -> tuple[RunConfig, str]:
    """The configuration the flags apply to, and its name for --help: the --config given, or
    else what the stage starts from (a preset, or the classify stage's recipe; with --init-from,
    its fine-tuning recipe). Read before the real parse, so that --help shows those values as
    the defaults."""
    parser = ArgumentParser(add_help=False)
    parser.add_argument("--config")
    flags = {flag.key: flag.names for group in FLAGS.values() for flag in group}
    parser.add_argument(*flags["train.stage"], dest="stage", default="pretrain")
    parser.add_argument(*flags["train.init_from"], dest="init_from")
    known = parser.parse_known_args(argv)[0]
    if known.config:
        return load_config(known.config), known.config
    if known.stage not in STAGES:
        return load_config(DEFAULT_CONFIG), DEFAULT_CONFIG  # the real parse reports the unknown stage
    stage = stage_named(known.stage)
    config = stage.default_config(starting_from_model=bool(known.init_from))
    return config, config.preset or f"the {stage.name} recipe"


def build_parser(defaults: RunConfig, config_name: str = DEFAULT_CONFIG, command: str = "train") -> ArgumentParser:
    prog = program_name(command)
    parser = ArgumentParser(
        prog=prog,
        description=(
            "Train a MiniGPT model. With no data given it trains on the built-in corpus (Python's own documentation).\n"
            f"Defaults shown are those of --config {config_name}; '{prog} --config PRESET --help' shows another's."
        ),
        epilog=(
            f"examples:\n"
            f"  {prog} --config tiny --max-steps 200 --plot-loss           # a first run in seconds\n"
            f"  {prog} --config small --data-files data/*.jsonl --max-time 3600\n"
            f"  {prog} --stage sft --init-from checkpoints/RUN/final_model --lora-rank 8   # chat fine-tuning\n"
            f"  {prog} --resume --max-steps 30000                         # continue the newest run, longer\n\n"
            f"{EXIT_STATUSES}"
        ),
    )
    parser.add_argument("--config", help=f"a preset ({', '.join(PRESETS)}) or a .toml/.json/.yaml file "
                        f"(default: {DEFAULT_CONFIG}; the classify stage's own recipe for --stage classify)")
    parser.add_argument(
        "--resume", "--resume-from-checkpoint", nargs="?", const="latest", default=None, metavar="CHECKPOINT_DIR",
        help="continue the latest checkpoint of --run-name (or of the newest run), or the given checkpoint directory",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any setting, e.g. --set model.n_layer=6 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved configuration as JSON and exit, writing nothing")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameters, memory (weights, gradients, optimizer, activations) against the device's, "
                             "and the step time from one timed micro-step; then exit without training or making a run directory")
    parser.add_argument("--dry-run-no-probe", action="store_true", help="--dry-run without the timed micro-step (estimates only)")
    for title, flags in FLAGS.items():
        group = parser.add_argument_group(title)
        for flag in flags:
            group.add_argument(*flag.names, **flag_options(flag, defaults))
        if title == "runtime":  # Hugging Face's precision switches, as --dtype values
            group.add_argument("--bf16", dest="dtype", action="store_const", const="bfloat16", help="the same as --dtype bfloat16")
            group.add_argument("--fp16", dest="dtype", action="store_const", const="float16", help="the same as --dtype float16")
    return parser


def config_from_arguments(arguments: argparse.Namespace, config: RunConfig) -> RunConfig:
    """`config` (the preset or file), then every flag the user actually gave (flags left out change nothing)."""
    overrides = {}
    given = {}  # setting -> the flag that set it, for refusing flags that do not apply to the stage
    for flag in (flag for flags in FLAGS.values() for flag in flags):
        value = getattr(arguments, flag.key.partition(".")[2])
        if value == "auto" and flag.key == "train.batch_size":
            overrides["train.auto_batch_size"] = True  # the configured batch x accumulation stays the global batch
        elif value is not None:
            overrides[flag.key] = value
            given[flag.key] = flag.names[0]
    for assignment in arguments.set:
        key, separator, value = assignment.partition("=")
        if not separator:
            raise UserInputError(f"--set expects KEY=VALUE (for example model.n_layer=6), got '{assignment}'.")
        overrides[key.strip()] = value.strip()
        given[key.strip()] = f"--set {key.strip()}"
    if arguments.resume:
        # Find the checkpoint once, here: prepare_run then gets its directory and only checks it.
        # A resumed run continues with the configuration it was started with; flags given now
        # (a longer --max-steps, say) still apply on top.
        paths = resolve_run_paths(apply_overrides(config, {**overrides, "train.resume": arguments.resume}, source="command line"))
        saved = paths.run_dir / "config.json"
        config = load_config(str(saved))  # a damaged or hand-edited config.json is one sentence, not a traceback
        if overrides.pop("train.auto_batch_size", False):
            if not config.train.auto_batch_size:
                raise UserInputError(
                    f"--batch-size auto chooses the micro-batch when a run starts, and {paths.run_dir} was started with "
                    f"--batch-size {config.train.batch_size}: resume it without --batch-size auto."
                )
            # The run chose its micro-batch and accumulation for the global batch asked at its start:
            # config.json holds both, and the accumulation given with auto again is part of that request.
            overrides.pop("train.gradient_accumulation_steps", None)
        overrides["train.resume"] = str(paths.resume_from)
        overrides.setdefault("train.run_name", paths.run_dir.name)
        overrides.setdefault("train.output_dir", str(paths.run_dir.parent))
    source = f"--config {arguments.config}" if arguments.config else "the command line"
    return configure(config, overrides, given, source, resumed=bool(arguments.resume))


def exit_status(stop_reason: str | None, stop_signal: int | None) -> int:
    """0 only when the run finished; 1 when it failed; 128 + the signal's number when a signal
    stopped it after saving (the shell's convention: 130 for Ctrl-C, 143 for SIGTERM)."""
    if stop_reason in ("non_finite_loss", "memory_limit", "out_of_memory"):
        return 1
    if stop_reason == "signal":
        return 128 + (stop_signal or signal.SIGINT)
    return 0


def train_command(argv: list[str], command: str = "train") -> int:
    """`minigpt train`, and `minigpt train-classifier` (which is this with --stage classify)."""
    refuse_hugging_face_only_flags(argv)
    base, config_name = base_config(argv)
    parser = build_parser(base, config_name, command)
    arguments = parser.parse_args(argv)
    config = config_from_arguments(arguments, base)
    if arguments.print_config:  # configure() has checked it
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if arguments.dry_run or arguments.dry_run_no_probe:
        print(dry_run(config, probe=not arguments.dry_run_no_probe))
        return 0
    trainer = prepare_run(config)  # under torchrun: joins the other processes
    run_dir = trainer.run_dir
    if trainer.is_main:
        record_session(run_dir, f"{program_name(command)} {shlex.join(argv)}")  # the command line and machine, for the report card
    log.info("Run directory: %s (train.log, metrics.jsonl, status.json, checkpoints%s)", run_dir,
             ", plots/" if config.train.plot_loss else "")
    summary = trainer.train()
    # Leave the process group only after a clean end: after a failure the process just exits, and
    # torchrun stops the others (a barrier here could wait for a process that is gone).
    compute_cleanup()
    log.info(trainer.stop_message())
    final_model = run_dir / "final_model"
    stage = stage_named(config.train.stage)
    if final_model.is_dir():
        log.info("Final model:    %s%s", final_model, stage.final_model_note(evaluated=trainer.val_batches is not None))
        for label, next_command in stage.next_steps(final_model):
            log.info("%-15s %s %s", f"{label}:", program_name(next_command.partition(" ")[0]), next_command.partition(" ")[2])
    if config.train.plot_loss:
        log.info("Loss curves:    %s", run_dir / "plots")
    log.info("Summary:        %s", run_dir / "summary.json")
    if config.train.report and trainer.is_main:
        log.info("Report:         %s", ", ".join(str(path) for path in write_report(run_dir)))
    return exit_status(summary["stop_reason"], trainer.stop_signal)


@run_command
def main(argv: list[str] | None = None) -> int:
    return train_command(sys.argv[1:] if argv is None else argv)
