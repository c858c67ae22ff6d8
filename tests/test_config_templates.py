"""The configs/ templates load and validate; YAML files work like TOML and JSON; a mistyped key names the nearest."""

from pathlib import Path

import pytest

from minigpt.cli.train import base_config
from minigpt.config import apply_overrides, load_config
from minigpt.run import check_config
from minigpt.errors import UserInputError

TEMPLATES = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_the_templates_cover_both_kinds_of_run():
    names = {path.stem for path in TEMPLATES}
    for name in ("default", "fast_dev", "production", "memory_efficient"):
        assert name in names and f"classify_{name}" in names


@pytest.mark.parametrize("template", TEMPLATES, ids=[path.stem for path in TEMPLATES])
def test_every_template_loads_and_validates(template):
    config = load_config(str(template))
    if config.train.lora_rank:  # a LoRA template is used with --init-from, as its header says
        config = apply_overrides(config, {"train.init_from": "checkpoints/RUN/final_model"})
    check_config(config)  # the stage's own rules too: no setting of another stage
    assert (config.train.stage == "classify") == template.stem.startswith("classify_")


def test_yaml_reads_like_toml(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: tiny\nmodel:\n  n_layer: 3\ntrain:\n  learning_rate: 1.0e-3\n  data_files: [a.jsonl]\n")
    config = load_config(str(tmp_path / "run.yaml"))
    assert (config.model.n_layer, config.train.learning_rate, config.train.data_files) == (3, 1e-3, ["a.jsonl"])


@pytest.mark.parametrize("text, message", [
    ("train:\n  learnig_rate: 0.1\n", "unknown setting 'train.learnig_rate'; did you mean 'train.learning_rate'?"),
    ("trian:\n  max_steps: 5\n", "did you mean 'train'?"),
    ("train: [unclosed\n", "could not be parsed"),
])
def test_a_bad_yaml_file_is_one_sentence(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(UserInputError, match=message.replace("?", r"\?").replace("(", r"\(").replace("[", r"\[")):
        load_config(str(tmp_path / "bad.yaml"))


def test_classify_default_is_the_train_classifier_recipe_written_out():
    """configs/classify_default.yaml says what `train-classifier` with no --config does."""
    written = load_config(str(next(path for path in TEMPLATES if path.stem == "classify_default")))
    built_in, _ = base_config(["--stage", "classify"])
    assert written.to_dict() == built_in.to_dict()
