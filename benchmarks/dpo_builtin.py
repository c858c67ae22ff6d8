"""DPO on the built-in preference set, with and without RPO's term: what each does to a chat model.

    python benchmarks/dpo_builtin.py CHAT_MODEL [--rpo-alpha 0 1] [--max-steps 300] [--threads 1] [--output-dir DIR]

For each --rpo-alpha, `minigpt train --stage dpo --init-from CHAT_MODEL` runs on the built-in set
(`minigpt.preference_corpus`) with the stage's recipe, evaluating every 25 steps. Printed per run:

    the validation preference accuracy (the share of held-out pairs whose chosen reply gets the
    higher reward; 0.5 before training, where the model is its reference) and the mean reward
    margin at each evaluation: the margin curve
    the chosen replies' mean negative log-likelihood per token on the validation pairs before and
    after: pure DPO only asks for a larger margin, which it can get by making both replies less
    likely; RPO's term holds the chosen reply likely
    how often the model alone (log-probabilities summed over the reply) prefers the chosen reply,
    before and after
    greedy replies to the first 24 validation prompts, before and after: how many loop (a run of
    three words said three times or more)

The before figures are the starting model's; the run directories are kept under --output-dir.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt.generation import SamplingConfig, complete  # noqa: E402
from minigpt.metrics import read_metrics  # noqa: E402
from minigpt.model_folder import load_language_model  # noqa: E402
from minigpt.run import configure, prepare_run  # noqa: E402
from minigpt.stages import STAGES  # noqa: E402
from minigpt.stages.dpo import reference_log_probs  # noqa: E402


GREEDY_PROMPTS, GREEDY_TOKENS = 24, 96


def loops(text: str) -> bool:
    """A run of three words that occurs three times or more."""
    words = text.split()
    runs = [" ".join(words[index : index + 3]) for index in range(len(words) - 2)]
    return any(runs.count(run) >= 3 for run in set(runs))


def greedy_loops(model: torch.nn.Module, tokenizer, prompts: list[list[dict]]) -> int:
    sampling = SamplingConfig(max_new_tokens=GREEDY_TOKENS, temperature=0.0, stop_ids=tokenizer.stop_ids(True))
    return sum(loops(complete(model, tokenizer, tokenizer.chat_prompt(prompt), sampling)) for prompt in prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chat_model")
    parser.add_argument("--rpo-alpha", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default="dpo_builtin_runs")
    arguments = parser.parse_args()
    for alpha in arguments.rpo_alpha:
        overrides = {"train.stage": "dpo", "train.init_from": arguments.chat_model, "train.rpo_alpha": alpha,
                     "train.max_steps": arguments.max_steps, "train.num_threads": arguments.threads, "train.dtype": "float32",
                     "train.output_dir": arguments.output_dir, "train.run_name": f"rpo-{alpha:g}"}
        config = configure(STAGES["dpo"].default_config(True), overrides, {}, "benchmarks/dpo_builtin.py")
        trainer = prepare_run(config, show_progress=False)
        before = trainer.objective.evaluate(trainer.model, trainer.val_batches, 0, torch.float32)
        val = trainer.val_batches
        start = load_language_model(arguments.chat_model)
        prompts = [trainer.val_batches.encoded.prompts[index] for index in range(min(GREEDY_PROMPTS, len(val.encoded)))]
        loops_before = greedy_loops(start.model, start.tokenizer, prompts)
        liked_before = float(np.mean(val.encoded.reference[:, 0] > val.encoded.reference[:, 1]))
        trainer.train()
        final = load_language_model(trainer.run_dir / "final_model")
        after = reference_log_probs(final.model, val, torch.device("cpu"), torch.float32)
        evaluations = [row for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row["type"] == "eval"]
        curve = "  ".join(f"{row['step']}: {row['val_accuracy']:.2f}/{row['val_margin']:+.2f}" for row in evaluations)
        last = evaluations[-1]
        print(f"rpo_alpha {alpha:g}, beta {config.train.dpo_beta:g}, learning rate {config.train.learning_rate:g}, "
              f"{len(trainer.train_batches.encoded)} training / {len(val.encoded)} validation pairs")
        print(f"  step: val accuracy / margin   0: {before['val_accuracy']:.2f}/{before['val_margin']:+.2f}  {curve}")
        print(f"  chosen NLL per token: {before['val_nll_chosen']:.3f} -> {last['val_nll_chosen']:.3f}   "
              f"rejected log-prob: {before['val_logps_rejected']:.1f} -> {last['val_logps_rejected']:.1f}")
        print(f"  the model alone prefers the chosen reply: {liked_before:.2f} -> {float(np.mean(after[:, 0] > after[:, 1])):.2f}")
        print(f"  greedy replies that loop, of {len(prompts)}: {loops_before} -> {greedy_loops(final.model, final.tokenizer, prompts)}")


if __name__ == "__main__":
    main()
