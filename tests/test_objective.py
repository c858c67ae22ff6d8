"""The objective seam: the trainer reads what "better" means, the weight and the tokens from the objective."""

import json

import torch

from minigpt.checkpoint import list_checkpoints
from minigpt.config import apply_overrides, preset_config
from minigpt.loss import IGNORE_INDEX
from minigpt.monitor import compare_runs, read_run, render_report
from minigpt.objective import LanguageModelObjective, Monitor
from minigpt.run import prepare_run
from minigpt.tokenizer import load_tokenizer
from minigpt.trainer import Callback


def tiny_config(tmp_path, corpus_jsonl, tokenizer_file, name, **overrides):
    return apply_overrides(preset_config("tiny"), {
        "train.data_files": [str(corpus_jsonl)], "train.tokenizer_path": str(tokenizer_file), "train.val_fraction": 0.1,
        "train.output_dir": str(tmp_path / "runs"), "train.run_name": name, "train.sample_tokens": 0,
        "train.eval_batches": 1, "train.disable_monitoring": True, "train.dtype": "float32", **overrides,
    })


class ScoredObjective(LanguageModelObjective):
    """A language model judged by a made-up score where higher is better, as a classifier's F1 is."""

    monitor = Monitor("val_score", "max")

    def __init__(self, tokenizer, scores):
        super().__init__(tokenizer)
        self.scores = iter(scores)

    def evaluate(self, model, batches, max_batches, dtype):
        return {**super().evaluate(model, batches, max_batches, dtype), "val_score": next(self.scores)}


def test_a_higher_is_better_metric_drives_pruning_early_stopping_summary_and_monitor(tmp_path, corpus_jsonl, tokenizer_file):
    objective = ScoredObjective(load_tokenizer(tokenizer_file), [0.2, 0.9, 0.5, 0.4, 0.3])
    config = tiny_config(tmp_path, corpus_jsonl, tokenizer_file, "scored", **{
        "train.max_steps": 100, "train.eval_steps": 10, "train.save_steps": 10, "train.keep_checkpoints": 1,
        "train.early_stopping_patience": 3,
    })
    trainer = prepare_run(config, show_progress=False, objective=objective)
    summary = trainer.train()
    assert summary["stop_reason"] == "early_stopping" and summary["steps"] == 50  # 0.9 at step 20, then three worse
    assert summary["monitor"] == "val_score" and summary["best_val_score"] == 0.9 and summary["last_val_score"] == 0.3
    # The newest checkpoint and the best by the score (not by the validation loss) survive pruning.
    assert [path.name for path in list_checkpoints(trainer.run_dir)] == ["checkpoint_step_20", "checkpoint_step_50"]
    assert json.loads((trainer.run_dir / "checkpoint_step_20" / "meta.json").read_text())["val_score"] == 0.9
    report = read_run(trainer.run_dir)
    assert report.monitor_metric == "val_score" and report.best == 0.9
    assert "best val_score 0.9000" in render_report(report)


def test_compare_ranks_runs_by_their_monitored_metric(tmp_path, corpus_jsonl, tokenizer_file):
    for name, scores in [("low", [0.3]), ("high", [0.8])]:
        config = tiny_config(tmp_path, corpus_jsonl, tokenizer_file, name, **{"train.max_steps": 10, "train.eval_steps": 10})
        prepare_run(config, show_progress=False, objective=ScoredObjective(load_tokenizer(tokenizer_file), scores)).train()
    table = compare_runs([read_run(tmp_path / "runs" / name) for name in ("low", "high")])
    assert "best val score" in table
    assert next(line for line in table.splitlines() if "<- best" in line).startswith("high")


def test_callbacks_passed_to_prepare_run_see_the_loop(tmp_path, corpus_jsonl, tokenizer_file):
    seen = []

    class Recorder(Callback):
        def on_log(self, trainer, row):
            seen.append(("log", row["step"]))

        def on_evaluate(self, trainer, row):
            seen.append(("eval", row["step"]))

    config = tiny_config(tmp_path, corpus_jsonl, tokenizer_file, "hooked", **{"train.max_steps": 20, "train.eval_steps": 20})
    prepare_run(config, show_progress=False, callbacks=[Recorder()]).train()
    assert seen == [("log", 10), ("log", 20), ("eval", 20)]


def test_the_step_is_divided_by_the_weight_of_all_its_micro_batches(tmp_path, corpus_jsonl, tokenizer_file):
    """Masked targets (chat prompts) make micro-batches weigh differently: the step's loss is the
    summed loss over the summed weight, not the mean of per-micro-batch means."""
    trainer = prepare_run(tiny_config(tmp_path, corpus_jsonl, tokenizer_file, "weights"), show_progress=False)
    objective = trainer.objective
    inputs, targets = objective.example_batch(2, 16)
    masked = targets.clone()
    masked[:, :12] = IGNORE_INDEX
    batches = [(inputs, targets), (inputs, masked)]
    assert [objective.weight(batch) for batch in batches] == [32, 8]
    with torch.no_grad():
        expected = sum(objective.loss(trainer.model, batch) for batch in batches) / 40
    loss, _, finite, tokens = trainer.optimizer_step(trainer.model, batches, timed=False)
    assert bool(finite) and tokens == 64
    torch.testing.assert_close(loss, expected)


def test_a_checkpoint_saved_inside_the_loop_carries_the_training_clock(tmp_path, corpus_jsonl, tokenizer_file):
    """--max-time and the time-driven schedule continue after a resume instead of starting over."""
    config = tiny_config(tmp_path, corpus_jsonl, tokenizer_file, "clock", **{"train.max_steps": 20, "train.save_steps": 10})
    trainer = prepare_run(config, show_progress=False)
    trainer.train()
    state = torch.load(trainer.run_dir / "checkpoint_step_10" / "state.pt", weights_only=True)
    final = torch.load(trainer.run_dir / "checkpoint_step_20" / "state.pt", weights_only=True)
    assert 0 < state["progress"]["elapsed_seconds"] < final["progress"]["elapsed_seconds"]
    resumed = prepare_run(apply_overrides(config, {"train.resume": str(trainer.run_dir / "checkpoint_step_10")}), show_progress=False)
    assert resumed.elapsed() >= state["progress"]["elapsed_seconds"]


def test_the_library_reaches_a_script_user_without_any_logging_set_up(tmp_path, corpus_jsonl, tokenizer_file):
    """`from minigpt import ...` in a plain script: the run's lines are printed, as the CLI prints them."""
    import subprocess
    import sys

    from conftest import REPO

    script = (
        "from minigpt import apply_overrides, prepare_run, preset_config\n"
        f"config = apply_overrides(preset_config('tiny'), {{'train.data_files': [{str(corpus_jsonl)!r}], "
        f"'train.tokenizer_path': {str(tokenizer_file)!r}, 'train.output_dir': 'runs', 'train.max_steps': 10, "
        "'train.sample_tokens': 0, 'train.eval_batches': 1, 'train.dtype': 'float32', 'train.val_fraction': 0.1})\n"
        "prepare_run(config, show_progress=False).train()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "step 10 | loss" in result.stdout


def test_the_public_api_names_functions_not_modules():
    """`from minigpt import generate` is the function even after its module was imported (no
    module of the package shares a name with a function of the public API)."""
    import minigpt
    import minigpt.generation  # noqa: F401 - imported first on purpose

    for name in minigpt.PUBLIC_API:
        assert callable(getattr(minigpt, name)), name
