"""`minigpt train-classifier`: train text classification heads on the trunk.

The same command line as `minigpt train` (every flag, --config, --resume, --set), with the stage
set to classify and, unless --config names another, a recipe chosen for a CPU: a small model
trained from scratch in a few minutes, or fine-tuned from `--init-from` at a lower learning rate.
"""

from __future__ import annotations

import json
import logging
import sys

from minigpt.cli.common import dash_spellings, program_name, run_command
from minigpt.cli.train import build_parser, chosen_config, config_from_arguments, exit_status
from minigpt.config import RunConfig, apply_overrides, load_config, validate
from minigpt.distributed import compute_cleanup
from minigpt.run import prepare_run

log = logging.getLogger("minigpt.train")

# From scratch on 2 CPU cores: one layer, 256 wide, over 256-token texts with a BPE vocabulary
# learned from the training texts. Tuned on the built-in set (benchmarks/classification_baseline.py):
# one layer beat two (macro-F1 0.91 against 0.89, a model this size over a thousand texts learns
# more from less depth), max pooling beat mean (one telling word anywhere in a text counts fully),
# and the auxiliary next-token loss on the same texts (--lm-loss-weight) kept the trunk learning
# after the labels were memorised. Longer training at this learning rate overfits (the validation
# loss rises), so the run is 800 steps, about four minutes, well inside its 10-minute bound.
# Evaluated often (the sets are small) and stopped after 8 evaluations without a better macro-F1.
CPU_RECIPE = {
    "model.block_size": 256, "model.n_layer": 1, "model.n_head": 4, "model.n_kv_head": 2, "model.n_embd": 256,
    "model.dropout": 0.1, "train.tokenizer_vocab_size": 2048, "train.pooling": "max", "train.lm_loss_weight": 1.0,
    "train.batch_size": 32, "train.learning_rate": 2e-3, "train.warmup_steps": 30,
    "train.max_steps": 800, "train.max_time": 600.0, "train.eval_steps": 50, "train.eval_batches": 1000, "train.save_steps": 100,
    "train.keep_checkpoints": 2, "train.early_stopping_patience": 8, "train.val_fraction": 0.1, "train.log_steps": 10,
    "train.sample_tokens": 0,
}
# Starting from a trained model: its shape comes with it, its last position already sums a text
# up, it knows the language already, and a gentler learning rate keeps what it knows.
FINE_TUNING = {"train.pooling": "last", "train.lm_loss_weight": 0.0}
FINE_TUNING_LEARNING_RATES = {"train.learning_rate": 3e-4}
RECIPE_NAME = "the CPU classification recipe"


def base_config(argv: list[str]) -> tuple[RunConfig, str]:
    """--config (stage set to classify), or the CPU recipe; with --init-from, the recipe's
    fine-tuning settings (and its learning rates, unless --learning-rate is given)."""
    arguments = dash_spellings(argv)
    if any(argument == "--config" or argument.startswith("--config=") for argument in arguments):
        name = chosen_config(argv)
        return apply_overrides(load_config(name), {"train.stage": "classify"}, source=name), name
    recipe = {**CPU_RECIPE, "train.stage": "classify"}
    given = {argument.partition("=")[0] for argument in arguments}
    if given & {"--init-from", "--freeze-trunk"}:  # --freeze-trunk alone is refused later, naming --init-from
        recipe.update(FINE_TUNING)
        if not given & {"--learning-rate", "--lr"}:
            recipe.update(FINE_TUNING_LEARNING_RATES)
    return apply_overrides(RunConfig(), recipe, source=RECIPE_NAME), RECIPE_NAME


@run_command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    base, config_name = base_config(argv)
    parser = build_parser(base, config_name)
    prog = parser.prog = program_name("train-classifier")
    parser.description = (
        "Train classification heads (one per task) on a MiniGPT trunk, from scratch or from --init-from.\n"
        "Data: .jsonl/.json records with a text and <task>_labels fields (or one labels field); none: the built-in\n"
        f"labelled set (which part of Python's standard library a docstring documents). Defaults shown: {config_name}."
    )
    parser.epilog = (
        "examples:\n"
        f"  {prog}                                                    # the built-in set, a few minutes\n"
        f"  {prog} --data-files train.jsonl --val-data-files val.jsonl --class-weights balanced\n"
        f"  {prog} --init-from checkpoints/RUN/final_model --freeze-trunk   # a linear probe\n"
        f"  {prog} --config configs/classify_production.yaml --data-files data/*.jsonl\n"
    )
    arguments = parser.parse_args(argv)
    config = config_from_arguments(arguments, base)
    if arguments.print_config:
        validate(config)
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    trainer = prepare_run(config)  # under torchrun: joins the other processes
    summary = trainer.train()
    compute_cleanup()  # after a clean end only, as `minigpt train` does
    log.info(trainer.stop_message())
    final_model = trainer.run_dir / "final_model"
    evaluated = trainer.val_batches is not None
    if final_model.is_dir():
        kept = "the best evaluation by macro-F1" if evaluated else "the last step's weights: there was no validation data"
        log.info("Final model:    %s (%s)", final_model, kept)
        log.info("Classify with:  %s %s --text \"...\"", program_name("classify"), final_model)
    if evaluated:
        log.info("Confusion matrices: %s", trainer.run_dir / "plots")
    log.info("Summary:        %s", trainer.run_dir / "summary.json")
    return exit_status(summary["stop_reason"], trainer.stop_signal)
