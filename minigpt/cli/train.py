"""`python scripts/train.py`: train a model (from a preset, a config file and flags)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from minigpt.cli.common import ArgumentParser, run_command, setup_logging
from minigpt.config import CHOICES, PRESETS, RunConfig, apply_overrides, load_config
from minigpt.errors import UserInputError
from minigpt.run import prepare_run, resolve_run_paths

log = logging.getLogger("minigpt.train")

# flag -> (configuration key, type, help). Every flag lands in the configuration, nothing else.
FLAGS: dict[str, tuple[str, type, str]] = {
    "--data-files": ("train.data_files", str, "training data: .jsonl/.txt files, directories or globs (default: the built-in corpus)"),
    "--val-data-files": ("train.val_data_files", str, "validation data (default: a hold-out of the training data)"),
    "--val-fraction": ("train.val_fraction", float, "share of documents held out for validation when no --val-data-files"),
    "--max-data-size": ("train.max_data_size", int, "train on at most this many documents (0 = all)"),
    "--text-field": ("train.text_field", str, "the JSONL field holding the text"),
    "--tokenizer": ("train.tokenizer_path", str, "use this tokenizer.json instead of training one"),
    "--tokenizer-type": ("train.tokenizer_type", str, "bpe or char"),
    "--tokenizer-vocab-size": ("train.tokenizer_vocab_size", int, "BPE vocabulary size"),
    "--tokenizer-samples": ("train.tokenizer_samples", int, "documents used to train the tokenizer (0 = all)"),
    "--learning-rate": ("train.learning_rate", float, "peak learning rate"),
    "--min-learning-rate": ("train.min_learning_rate", float, "learning rate at the end of the decay"),
    "--lr-scheduler": ("train.lr_scheduler", str, "cosine, linear or constant (after the warmup)"),
    "--warmup-steps": ("train.warmup_steps", int, "steps of linear warmup"),
    "--weight-decay": ("train.weight_decay", float, "AdamW weight decay for the matrices"),
    "--grad-clip": ("train.grad_clip", float, "clip the gradient norm to this (0 = off)"),
    "--batch-size": ("train.batch_size", int, "sequences per micro-batch"),
    "--gradient-accumulation-steps": ("train.gradient_accumulation_steps", int, "micro-batches per optimizer step"),
    "--block-size": ("model.block_size", int, "context length in tokens"),
    "--max-steps": ("train.max_steps", int, "optimizer steps to train for (0 = until --max-time)"),
    "--max-time": ("train.max_time", float, "wall-clock budget in seconds: stop, evaluate and save when it runs out"),
    "--eval-steps": ("train.eval_steps", int, "evaluate every this many steps"),
    "--eval-batches": ("train.eval_batches", int, "validation batches per evaluation"),
    "--save-steps": ("train.save_steps", int, "save a checkpoint every this many steps"),
    "--keep-checkpoints": ("train.keep_checkpoints", int, "checkpoints kept (the best by validation loss is always kept too)"),
    "--early-stopping-patience": ("train.early_stopping_patience", int, "stop after this many evaluations without improvement (0 = off)"),
    "--log-steps": ("train.log_steps", int, "log every this many steps"),
    "--sample-tokens": ("train.sample_tokens", int, "tokens generated as a sample at each evaluation (0 = none)"),
    "--output-dir": ("train.output_dir", str, "root directory of runs"),
    "--run-name": ("train.run_name", str, "name of this run's directory (default: <preset>-<date>-<time>)"),
    "--seed": ("train.seed", int, "random seed"),
    "--device": ("train.device", str, "auto, cpu, cuda or mps"),
    "--dtype": ("train.dtype", str, "auto, float32, bfloat16 or float16"),
    "--num-threads": ("train.num_threads", int, "CPU threads (default: the physical cores available to the process)"),
    "--dataloader-workers": ("train.dataloader_workers", int, "processes that read and tokenize data (-1 = auto: up to 4 on CUDA, 0 elsewhere)"),
    "--compile-mode": ("train.compile_mode", str, "torch.compile mode with --enable-compile (auto: max-autotune on CUDA, default elsewhere)"),
    "--max-cpu": ("train.max_cpu", float, "hold this process at or below PERCENT of the machine's CPU (0 = no limit)"),
    "--max-memory": ("train.max_memory", float, "save and stop cleanly if system memory stays above PERCENT (0 = no limit)"),
}
SWITCHES: dict[str, tuple[str, str]] = {
    "--use-full-data": ("train.use_full_data", "train on every .jsonl/.txt file under ./data/"),
    "--token-cache": ("train.token_cache", "tokenize the data once into <output-dir>/token_cache/ (reused while the files and tokenizer stay the same)"),
    "--retrain-tokenizer": ("train.retrain_tokenizer", "train a new tokenizer even if one is cached"),
    "--plot-loss": ("train.plot_loss", "save loss-curve PNGs under plots/ at every checkpoint and at the end"),
    "--enable-compile": ("train.compile", "torch.compile the model (slow first step, faster after)"),
    "--disable-optimizations": ("train.disable_optimizations", "eager float32, plain AdamW, math attention: every optimisation off, for debugging"),
    "--disable-monitoring": ("train.disable_monitoring", "no CPU/memory sampling, anomaly checks or resource governor"),
    "--overfit-batch": ("train.overfit_batch", "train on one fixed batch: the loss must fall to about 0"),
    "--profile": ("train.profile", "print where the step time goes (data, forward, backward, optimizer) after a few steps"),
    "--tensorboard": ("train.tensorboard", "also write TensorBoard event files (needs the 'tensorboard' extra)"),
    "--wandb": ("train.wandb", "also log to Weights & Biases, offline unless WANDB_MODE=online (needs the 'wandb' extra)"),
}
LIST_KEYS = {"train.data_files", "train.val_data_files"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="train.py",
        description="Train a MiniGPT model. With no data given it trains on the built-in corpus (Python's own documentation).",
    )
    parser.add_argument("--config", default="medium", help=f"a preset ({', '.join(PRESETS)}) or a .toml/.json file (default: medium)")
    for flag, (key, kind, help_text) in FLAGS.items():
        choices = CHOICES.get(key)
        if key in LIST_KEYS:
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, choices=choices, help=help_text)
    for flag, (_, help_text) in SWITCHES.items():
        parser.add_argument(flag, action="store_true", default=None, help=help_text)
    parser.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT_DIR",
        help="continue the latest checkpoint of --run-name (or of the newest run), or the given checkpoint directory",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any setting, e.g. --set model.n_layer=6 (repeatable)",
    )
    return parser


def config_from_arguments(arguments) -> RunConfig:
    """Preset or file, then every flag the user actually gave (flags left out change nothing)."""
    overrides = {}
    for flag, (key, _, _) in FLAGS.items():
        value = getattr(arguments, flag[2:].replace("-", "_"))
        if value is not None:
            overrides[key] = value
    for flag, (key, _) in SWITCHES.items():
        if getattr(arguments, flag[2:].replace("-", "_")):
            overrides[key] = True
    for assignment in arguments.set:
        key, separator, value = assignment.partition("=")
        if not separator:
            raise UserInputError(f"--set expects KEY=VALUE (for example model.n_layer=6), got '{assignment}'.")
        overrides[key.strip()] = value.strip()
    config = load_config(arguments.config)
    if arguments.resume:
        overrides["train.resume"] = arguments.resume
        # A resumed run continues with the configuration it was started with; flags given now
        # (a longer --max-steps, say) still apply on top.
        run_dir = resolve_run_paths(apply_overrides(config, overrides, source="command line")).run_dir
        saved = json.loads((run_dir / "config.json").read_text())
        config = RunConfig.from_dict(saved, source=str(run_dir / "config.json"))
        overrides.setdefault("train.run_name", run_dir.name)
        overrides.setdefault("train.output_dir", str(run_dir.parent))
    return apply_overrides(config, overrides, source="command line")


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    setup_logging()
    config = config_from_arguments(arguments)
    trainer = prepare_run(config)
    run_dir = trainer.run_dir
    log.info("Run directory: %s (metrics.jsonl, status.json, checkpoints%s)", run_dir, ", plots/" if config.train.plot_loss else "")
    summary = trainer.train()
    log.info(trainer.stop_message())
    final_model = run_dir / "final_model"
    if final_model.is_dir():
        log.info("Final model:    %s", final_model)
        log.info("Generate text:  python scripts/generate.py %s --prompt \"...\"", final_model)
    if config.train.plot_loss:
        log.info("Loss curves:    %s", Path(run_dir) / "plots")
    log.info("Summary:        %s", run_dir / "summary.json")
    return 1 if summary["stop_reason"] in ("non_finite_loss", "memory_limit") else 0  # the run did not finish
