"""Stages as objects: the registry, settings that apply to one stage only, the seed command lines
(learning-rate floor, Hugging Face spellings), train-classifier as the classify stage, train.log."""

import json
import re

import pytest
import torch

from minigpt.cli import train as train_cli
from minigpt.cli import train_classifier
from minigpt.config import RunConfig, apply_overrides, load_config, preset_config
from minigpt.errors import UserInputError
from minigpt.objective import LanguageModelObjective
from minigpt.run import check_config, prepare_run
from minigpt.stages import STAGES, stage_of
from minigpt.stages.pretrain import PretrainStage


def printed_config(capsys, *argv: str) -> dict:
    """The configuration `minigpt train ARGV --print-config` resolves (in-process)."""
    assert train_cli.main([*argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)["train"]


def refused(capsys, main, *argv: str) -> str:
    """The one-line error a command prints for ARGV, checked to exit with status 2."""
    assert main(list(argv)) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


# --- the seed command lines ------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "small", "medium", "large"])
def test_a_fine_tuning_learning_rate_works_on_every_preset(capsys, preset):
    """The floor is a fraction of the peak: 3e-5 on a preset whose own peak is 6e-4 decays to 3e-6."""
    train = printed_config(capsys, "--config", preset, "--learning-rate", "3e-5")
    config = apply_overrides(RunConfig(), {f"train.{key}": value for key, value in train.items()})
    assert config.train.final_learning_rate == pytest.approx(3e-6)


def test_the_classify_recipe_takes_a_fine_tuning_learning_rate_too(capsys):
    assert printed_config(capsys, "--stage", "classify", "--learning-rate", "3e-5")["learning_rate"] == 3e-5
    assert train_classifier.main(["--learning-rate", "3e-5", "--print-config"]) == 0


def test_an_explicit_floor_above_the_peak_is_still_refused(capsys):
    message = refused(capsys, train_cli.main, "--config", "tiny", "--learning-rate", "3e-5", "--min-learning-rate", "1e-4", "--print-config")
    assert "above the learning rate" in message


def test_hugging_face_trainer_spellings_are_read_as_minigpt_flags(capsys):
    train = printed_config(capsys, "--config", "tiny", "--num_train_epochs", "3", "--per_device_train_batch_size", "8",
                           "--warmup_ratio", "0.1", "--logging_steps", "7", "--save_total_limit", "2", "--bf16",
                           "--learning_rate", "5e-5", "--weight_decay", "0.01", "--max_grad_norm", "0.5",
                           "--gradient_accumulation_steps", "2", "--eval_steps", "20", "--save_steps", "40", "--seed", "3",
                           "--output_dir", "elsewhere", "--run_name", "hf", "--evaluation_strategy", "epoch", "--save_strategy", "epoch",
                           "--lr_scheduler_type", "linear", "--adam_beta2", "0.99")
    assert train["num_epochs"] == 3 and train["max_steps"] == 0  # the epochs replace the preset's step count
    assert train["warmup_ratio"] == 0.1 and train["warmup_steps"] == 0  # and the ratio its warmup steps
    assert (train["batch_size"], train["log_steps"], train["keep_checkpoints"], train["dtype"]) == (8, 7, 2, "bfloat16")
    assert (train["learning_rate"], train["weight_decay"], train["grad_clip"], train["gradient_accumulation_steps"]) == (5e-5, 0.01, 0.5, 2)
    assert (train["eval_steps"], train["save_steps"], train["seed"], train["output_dir"], train["run_name"]) == (20, 40, 3, "elsewhere", "hf")
    assert (train["eval_strategy"], train["save_strategy"], train["lr_scheduler"], train["beta2"]) == ("epoch", "epoch", "linear", 0.99)
    assert printed_config(capsys, "--config", "tiny", "--fp16")["dtype"] == "float16"


def test_an_explicit_step_count_still_bounds_an_epoch_run(capsys):
    train = printed_config(capsys, "--config", "medium", "--learning-rate", "3e-5", "--num_train_epochs", "1", "--max-steps", "20")
    assert (train["num_epochs"], train["max_steps"]) == (1, 20)


def test_the_classify_recipes_epoch_floor_gives_way_to_a_length_the_user_gives(capsys):
    """The recipe's 800 steps grow to 8 epochs of a large set (min_epochs); a --max-steps or
    --num-epochs typed on the command line is the run's length as given."""
    recipe = printed_config(capsys, "--stage", "classify")
    assert (recipe["max_steps"], recipe["min_epochs"], recipe["group_by_length"]) == (800, 8, "auto")
    assert printed_config(capsys, "--stage", "classify", "--max-steps", "100")["min_epochs"] == 0
    assert printed_config(capsys, "--stage", "classify", "--num-epochs", "2")["min_epochs"] == 0


@pytest.mark.parametrize("flag, hint", [("--do_train", "always trains"), ("--report_to=wandb", "--wandb"),
                                        ("--per_device_eval_batch_size", "--eval-batches"), ("--overwrite_output_dir", "--run-name")])
def test_hugging_face_flags_with_no_meaning_here_name_the_nearest_flag(capsys, flag, hint):
    message = refused(capsys, train_cli.main, "--config", "tiny", flag, "--print-config")
    assert flag.partition("=")[0] in message and hint in message


def test_warmup_steps_and_ratio_together_are_refused(capsys):
    assert "not both" in refused(capsys, train_cli.main, "--config", "tiny", "--warmup-steps", "10", "--warmup-ratio", "0.1", "--print-config")


def test_epoch_strategies_need_epochs(capsys):
    assert "--num-epochs" in refused(capsys, train_cli.main, "--config", "tiny", "--eval-strategy", "epoch", "--print-config")


def test_a_wandb_project_turns_wandb_on(capsys):
    train = printed_config(capsys, "--config", "tiny", "--wandb-project", "my-project")
    assert train["wandb"] is True and train["wandb_project"] == "my-project"


# --- settings that apply to one stage only ---------------------------------------------------

@pytest.mark.parametrize("stage, flag", [("pretrain", "--pooling=max"), ("pretrain", "--freeze-trunk"), ("sft", "--tasks=topic"),
                                         ("classify", "--sample-prompt=hi"), ("classify", "--overfit-batch"),
                                         ("pretrain", "--sample-prompt=hi"), ("dpo", "--packing=off")])
def test_a_flag_of_another_stage_is_refused_naming_its_stages(capsys, stage, flag):
    message = refused(capsys, train_cli.main, "--stage", stage, "--config", "tiny", flag, "--print-config")
    assert flag.partition("=")[0] in message and f"not to --stage {stage}" in message


def test_sft_packs_conversations_unless_told_otherwise(capsys):
    assert printed_config(capsys, "--stage", "sft", "--config", "tiny")["packing"] == "on"
    assert printed_config(capsys, "--stage", "sft", "--config", "tiny", "--packing", "off")["packing"] == "off"


def test_a_flag_given_at_its_default_value_is_refused_too(capsys):
    """--pooling last is the default, but given to pretraining it would still be ignored."""
    assert "--pooling" in refused(capsys, train_cli.main, "--config", "tiny", "--pooling", "last", "--print-config")


def test_a_config_file_key_of_another_stage_is_refused_unless_it_holds_its_default(tmp_path, capsys):
    (tmp_path / "pooled.yaml").write_text("preset: tiny\ntrain:\n  pooling: max\n")
    message = refused(capsys, train_cli.main, "--config", str(tmp_path / "pooled.yaml"), "--print-config")
    assert "train.pooling" in message and "--stage classify" in message
    (tmp_path / "default.yaml").write_text("preset: tiny\ntrain:\n  pooling: last\n  freeze_trunk: false\n")
    assert printed_config(capsys, "--config", str(tmp_path / "default.yaml"))["pooling"] == "last"


def test_a_run_config_listing_every_key_stays_loadable_for_every_stage(tmp_path, capsys):
    for stage in STAGES:
        config = apply_overrides(preset_config("tiny"), {"train.stage": stage, "train.init_from": "base" if stage in ("sft", "dpo") else ""})
        (tmp_path / f"{stage}.json").write_text(json.dumps(config.to_dict()))
        check_config(load_config(str(tmp_path / f"{stage}.json")))


def test_train_classifier_is_the_classify_stage(capsys):
    assert train_classifier.main(["--print-config"]) == 0
    recipe = json.loads(capsys.readouterr().out)
    assert recipe == {"model": recipe["model"], "train": printed_config(capsys, "--stage", "classify"), "preset": ""}
    assert recipe["train"]["stage"] == "classify" and recipe["model"]["n_layer"] == 1  # the CPU recipe, not a preset
    assert "train-classifier trains --stage classify" in refused(capsys, train_classifier.main, "--stage", "sft")


def test_train_classifier_dry_run_estimates_and_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_classifier.main(["--dry-run-no-probe", "--output-dir", "runs", "--max-steps", "5"]) == 0
    report = capsys.readouterr().out
    assert "parameters" in report.lower()
    assert not [path for path in (tmp_path / "runs").glob("*") if (path / "config.json").exists()]  # no run directory


# --- the registry ----------------------------------------------------------------------------

class CountingObjective(LanguageModelObjective):
    """A language-model objective that counts the batches it scores: what a new stage would bring."""

    batches = 0

    def loss(self, model, batch):
        self.batches += 1
        return super().loss(model, batch)


class CountingStage(PretrainStage):
    name = "counting"
    help = "pretraining that counts its batches"

    def build_objective(self, config, tokenizer, train_stream):
        return CountingObjective(tokenizer, sample_tokens=config.train.sample_tokens, seed=config.train.seed)


def test_a_new_stage_plugs_in_with_one_registry_entry(tmp_path, corpus_jsonl, tokenizer_file, monkeypatch):
    monkeypatch.setitem(STAGES, "counting", CountingStage())
    config = apply_overrides(preset_config("tiny"), {
        "train.stage": "counting", "train.data_files": [str(corpus_jsonl)], "train.tokenizer_path": str(tokenizer_file),
        "train.output_dir": str(tmp_path / "runs"), "train.run_name": "counting", "train.max_steps": 3, "train.sample_tokens": 0,
        "train.disable_monitoring": True, "train.dtype": "float32", "train.val_fraction": 0.1, "train.eval_batches": 1})
    assert isinstance(stage_of(config), CountingStage)
    trainer = prepare_run(config, show_progress=False)
    summary = trainer.train()
    assert summary["steps"] == 3 and trainer.objective.batches >= 3
    assert json.loads((trainer.run_dir / "config.json").read_text())["train"]["stage"] == "counting"
    with pytest.raises(UserInputError, match="Unknown stage 'nonesuch'"):
        check_config(apply_overrides(config, {"train.stage": "nonesuch"}))


# --- train.log -------------------------------------------------------------------------------

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def test_every_run_writes_train_log_and_a_resume_appends_to_it(tmp_path, corpus_jsonl, tokenizer_file, capsys):
    common = ["--config", "tiny", "--data-files", str(corpus_jsonl), "--tokenizer", str(tokenizer_file), "--output-dir",
              str(tmp_path / "runs"), "--run-name", "logged", "--sample-tokens", "0", "--dtype", "float32", "--eval-steps", "4",
              "--save-steps", "4", "--log-steps", "2", "--val-fraction", "0.1", "--eval-batches", "1"]
    assert train_cli.main([*common, "--max-steps", "4"]) == 0
    log_file = tmp_path / "runs" / "logged" / "train.log"
    first = log_file.read_text().splitlines()
    assert first and all(TIMESTAMP.match(line) for line in first)
    text = "\n".join(first)
    assert "parameters" in text and "step 4 | loss" in text and "val loss" in text  # setup, progress, evaluation
    assert train_cli.main([*common, "--resume", "--max-steps", "8"]) == 0
    both = log_file.read_text().splitlines()
    assert both[:len(first)] == first  # appended, not rewritten
    assert any("Resumed from" in line for line in both[len(first):]) and any("step 8 | loss" in line for line in both)
    assert first[-1].endswith("Reached max_steps.") and both[-1].endswith("Reached max_steps.")  # how each session ended
    capsys.readouterr()


def test_an_error_that_ends_a_run_is_the_last_line_of_its_log(tmp_path, corpus_jsonl, tokenizer_file, monkeypatch):
    config = apply_overrides(preset_config("tiny"), {
        "train.data_files": [str(corpus_jsonl)], "train.tokenizer_path": str(tokenizer_file), "train.output_dir": str(tmp_path / "runs"),
        "train.run_name": "failing", "train.max_steps": 3, "train.sample_tokens": 0, "train.disable_monitoring": True,
        "train.dtype": "float32", "train.val_fraction": 0})
    trainer = prepare_run(config, show_progress=False)

    def broken_loss(model, batch):
        raise UserInputError("The data went away.")

    monkeypatch.setattr(trainer.objective, "loss", broken_loss)
    with pytest.raises(UserInputError):
        trainer.train()
    assert (trainer.run_dir / "train.log").read_text().splitlines()[-1].endswith("error: The data went away.")
    assert torch.is_tensor(torch.zeros(1))  # the process goes on: the log handler is gone, nothing left open


def test_a_warmup_as_long_as_the_run_is_said(tmp_path, corpus_jsonl, tokenizer_file, caplog):
    """tiny warms up for 10 steps: a 5-step run with --learning-rate 3e-5 would never reach 3e-5, and the log says so."""
    config = apply_overrides(preset_config("tiny"), {
        "train.data_files": [str(corpus_jsonl)], "train.tokenizer_path": str(tokenizer_file), "train.output_dir": str(tmp_path / "runs"),
        "train.run_name": "short", "train.max_steps": 5, "train.learning_rate": 3e-5, "train.disable_monitoring": True,
        "train.dtype": "float32", "train.val_fraction": 0})
    with caplog.at_level("WARNING", logger="minigpt"):
        trainer = prepare_run(config, show_progress=False)
    trainer.run_log.close()
    assert "The warmup (10 steps) is as long as the run (5 steps): the learning rate never reaches 3e-05" in caplog.text
