"""minigpt.model_folder: every kind of folder is recognised and loads, what is not one is refused in
one sentence, and the commands take the same set of folders."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from minigpt.checkpoint import save_checkpoint, write_model_files
from minigpt.cli import chat, classify, evaluate, export, generate, merge_lora, train
from minigpt.config import ModelConfig, RunConfig
from minigpt.errors import UserInputError
from minigpt.export import PEFT_CONFIG, PEFT_WEIGHTS, export_hf, export_peft
from minigpt.heads import GPTClassifier
from minigpt.lora import LoRAConfig, apply_lora, lora_parameters, lora_state_dict
from minigpt.model import GPT
from minigpt.model_folder import (
    LORA_ADAPTER_CONFIG, LORA_ADAPTER_WEIGHTS, OLD_ADAPTER_CONFIG, OLD_ADAPTER_WEIGHTS, AdapterRun, FolderKind, identify, load,
    load_classifier, load_language_model, save_model_directory,
)
from minigpt.tokenizer import load_tokenizer

LORA = LoRAConfig(rank=2, alpha=4.0, targets=("q", "v"))
LABEL_MAPS = {"sentiment": ["negative", "positive"]}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    return load_tokenizer(tokenizer_file)


@pytest.fixture(scope="module")
def run_config(tokenizer) -> RunConfig:
    return RunConfig(model=ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer, run_config):
    """One folder of every kind, built in-process from tiny models: name -> path."""
    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    base_model = GPT(run_config.model).eval()
    base = save_model_directory(root / "base" / "final_model", base_model, run_config, tokenizer)

    # A run directory with checkpoints only (no final_model/ yet): it stands for its latest checkpoint.
    for step in (1, 2):
        save_checkpoint(root / "unfinished", step, base_model, {}, {}, run_config, tokenizer)

    # A LoRA run's final_model/ (new file names), with its adapters away from zero.
    adapted = apply_lora(copy.deepcopy(base_model), LORA)
    with torch.no_grad():
        for parameter in lora_parameters(adapted):
            parameter.normal_(0, 0.2)
    sft_config = dataclasses.replace(run_config, train=dataclasses.replace(run_config.train, stage="sft", lora_rank=LORA.rank))
    adapter = AdapterRun.start(LORA, base).save(root / "lora" / "final_model", adapted,
                                                lambda directory: write_model_files(directory, sft_config, tokenizer))

    # The same adapter as MiniGPT wrote it before it had its own file names.
    old = shutil.copytree(adapter, root / "old-lora" / "final_model")
    (old / LORA_ADAPTER_CONFIG).rename(old / OLD_ADAPTER_CONFIG)
    (old / LORA_ADAPTER_WEIGHTS).rename(old / OLD_ADAPTER_WEIGHTS)

    # A LoRA run's checkpoint: adapter weights only, the base named in meta.json.
    recipe = AdapterRun.start(LORA, base)
    save_checkpoint(root / "lora-unfinished", 1, adapted, {}, {"base_model": recipe.base_path, "base_model_sha256": recipe.base_sha256},
                    sft_config, tokenizer)

    classifier_config = dataclasses.replace(run_config, train=dataclasses.replace(run_config.train, stage="classify", label_maps=LABEL_MAPS))
    classifier = save_model_directory(root / "classifier" / "final_model", GPTClassifier(classifier_config).eval(), classifier_config, tokenizer)

    hugging_face = export_hf(base_model, tokenizer, root / "hf")
    # What `minigpt export --format peft` (or PEFT's save_pretrained) writes: a PEFT adapter, on the
    # base's Hugging Face folder, and the same adapter naming no base folder.
    peft = export_peft(lora_state_dict(adapted), run_config.model, LORA.alpha, LORA.dropout, root / "peft", str(hugging_face))
    peft_without_base = export_peft(lora_state_dict(adapted), run_config.model, LORA.alpha, LORA.dropout, root / "peft-no-base")
    random = root / "random"
    random.mkdir()
    (random / "notes.txt").write_text("not a model")
    return {
        "final_model": base, "run": base.parent, "checkpoint": root / "unfinished" / "checkpoint_step_2",
        "run_without_final_model": root / "unfinished", "lora": adapter, "lora_run": adapter.parent, "old_lora": old,
        "lora_checkpoint": root / "lora-unfinished" / "checkpoint_step_1", "peft": peft, "peft_without_base": peft_without_base, "classifier": classifier,
        "hf": hugging_face, "random": random, "missing": root / "missing",
    }


def assert_one_sentence(message: str, *phrases: str) -> None:
    assert message.count(". ") == 0 and message.endswith(".") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)


# ----------------------------------------------------------------------------- identify and load


@pytest.mark.parametrize(("name", "kind", "source"), [
    ("final_model", FolderKind.LANGUAGE_MODEL, "final_model"),
    ("run", FolderKind.LANGUAGE_MODEL, "final_model"),  # a run directory stands for its final_model/
    ("checkpoint", FolderKind.LANGUAGE_MODEL, "checkpoint"),
    ("run_without_final_model", FolderKind.LANGUAGE_MODEL, "checkpoint"),  # ... or its latest checkpoint
    ("lora", FolderKind.LORA_ADAPTER, "lora"),
    ("lora_run", FolderKind.LORA_ADAPTER, "lora"),
    ("old_lora", FolderKind.LORA_ADAPTER, "old_lora"),
    ("peft", FolderKind.LORA_ADAPTER, "peft"),
    ("classifier", FolderKind.CLASSIFIER, "classifier"),
    ("hf", FolderKind.HUGGING_FACE, "hf"),
])
def test_each_kind_is_recognised_and_loads(folders, tokenizer, name, kind, source):
    assert identify(folders[name]).kind is kind and identify(folders[name]).path == folders[source]
    loaded = load(folders[name])
    assert loaded.kind is kind and loaded.source == folders[source] and loaded.is_classifier == (kind is FolderKind.CLASSIFIER)
    assert loaded.tokenizer.vocab_size == tokenizer.vocab_size and not loaded.model.training
    assert isinstance(loaded.model, GPTClassifier) == (kind is FolderKind.CLASSIFIER)
    if kind is FolderKind.CLASSIFIER:
        assert loaded.config.train.label_maps == LABEL_MAPS and set(loaded.model.heads) == {"sentiment"}


def test_an_adapter_loads_on_its_base_with_its_run_stage_and_recipe(folders):
    ids = torch.tensor([[0, 5, 9, 14]])
    merged, unmerged, base = load(folders["lora"]), load(folders["lora"], merge_adapter=False), load(folders["final_model"])
    assert merged.stage == "sft" and base.stage == "pretrain"  # the fine-tuning run's config.json, not the base's
    assert unmerged.adapter.config == LORA and unmerged.adapter.base_path == str(folders["final_model"].resolve())
    assert set(lora_state_dict(unmerged.model)) and not lora_state_dict(merged.model)  # merged: a plain GPT again
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids)[0], unmerged.model(ids)[0], atol=1e-5, rtol=0)
        assert (merged.model(ids)[0] - base.model(ids)[0]).abs().max() > 1e-3  # the adapter is on


def test_an_old_format_adapter_loads_exactly_like_the_new_one(folders):
    ids = torch.tensor([[0, 5, 9, 14]])
    assert "peft_type" not in json.loads((folders["old_lora"] / OLD_ADAPTER_CONFIG).read_text())
    with torch.no_grad():
        assert torch.equal(load(folders["old_lora"]).model(ids)[0], load(folders["lora"]).model(ids)[0])


def test_a_peft_adapter_loads_on_its_base_folder_exactly_like_the_minigpt_adapter(folders):
    ids = torch.tensor([[0, 5, 9, 14]])
    peft, minigpt = load(folders["peft"], merge_adapter=False), load(folders["lora"], merge_adapter=False)
    assert peft.adapter.config == LORA and peft.adapter.base_path == str(folders["hf"]) and peft.adapter.base_sha256 == ""
    with torch.no_grad():
        torch.testing.assert_close(peft.model(ids)[0], minigpt.model(ids)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(load(folders["peft"]).model(ids)[0], minigpt.model(ids)[0], atol=1e-5, rtol=0)  # merged


@pytest.mark.parametrize(("change", "phrases"), [
    ({"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"}, ("not a folder here", "never downloads", "base_model_name_or_path")),
    ({"use_dora": True}, ("use_dora", "does not compute", "merge_and_unload")),
    ({"target_modules": ["q_proj", "lm_head"]}, ("targets", "all-linear")),
    ({"peft_type": "IA3"}, ("IA3", "LoRA adapters")),
])
def test_a_peft_adapter_minigpt_cannot_compute_is_refused_in_one_sentence(folders, tmp_path, change, phrases):
    folder = shutil.copytree(folders["peft"], tmp_path / "peft")
    record = json.loads((folder / PEFT_CONFIG).read_text())
    (folder / PEFT_CONFIG).write_text(json.dumps({**record, **change}))
    assert identify(folder).kind is FolderKind.LORA_ADAPTER
    with pytest.raises(UserInputError) as error:
        load(folder)
    assert_one_sentence(str(error.value), *phrases)


def test_adapters_are_written_under_minigpt_names_never_peft_names(folders):
    names = {path.name for path in folders["lora"].iterdir()}
    assert {LORA_ADAPTER_CONFIG, LORA_ADAPTER_WEIGHTS} <= names and not names & {PEFT_CONFIG, PEFT_WEIGHTS}
    assert set(load_file(str(folders["lora"] / LORA_ADAPTER_WEIGHTS))) == set(lora_state_dict(load(folders["lora"], merge_adapter=False).model))


@pytest.mark.parametrize(("name", "phrases"), [
    ("random", ("holds no model", "final_model/", "Hugging Face")),
    ("missing", ("does not exist",)),
    ("lora_checkpoint", ("checkpoint of a LoRA run", "--resume")),
])
def test_what_is_not_a_model_folder_is_refused_in_one_sentence(folders, name, phrases):
    with pytest.raises(UserInputError) as error:
        identify(folders[name])
    assert_one_sentence(str(error.value), *phrases)


def test_each_loader_refuses_the_kind_it_cannot_use(folders):
    with pytest.raises(UserInputError) as error:
        load_language_model(folders["classifier"])
    assert_one_sentence(str(error.value), "is a classifier", "minigpt classify")
    with pytest.raises(UserInputError) as error:
        load_classifier(folders["lora"])
    assert_one_sentence(str(error.value), "holds a LoRA adapter, not a classifier", "train-classifier")


def test_an_adapter_cannot_be_the_base_of_another(folders):
    with pytest.raises(UserInputError) as error:
        AdapterRun.start(LORA, folders["lora"])
    assert_one_sentence(str(error.value), "merge-lora")


def test_a_classifier_and_its_configuration_must_agree(tmp_path, folders, tokenizer, run_config):
    with pytest.raises(ValueError):  # a classifier saved with a language model's configuration would not be recognised
        classify_config = dataclasses.replace(run_config, train=dataclasses.replace(run_config.train, stage="classify", label_maps=LABEL_MAPS))
        save_model_directory(tmp_path / "wrong", GPT(run_config.model), classify_config, tokenizer)


# ----------------------------------------------------------------------------- the commands take the same folders


LANGUAGE_MODEL_FOLDERS = ["final_model", "run", "checkpoint", "run_without_final_model", "lora", "lora_run", "old_lora", "peft", "hf"]
ADAPTER_FOLDERS = ["lora", "lora_run", "old_lora", "peft"]
REFUSED_FOLDERS = ["classifier", "peft_without_base", "random", "lora_checkpoint"]


def run_command(command: str, folder, tmp_path, corpus_jsonl, adapter: bool) -> int:
    """One in-process command on `folder`, with small settings; its exit status."""
    path = str(folder)
    if command == "evaluate":
        return evaluate.main([path, "--data-files", str(corpus_jsonl), "--batch-size", "1", "--block-size", "8", "--max-batches", "1"])
    if command == "generate":
        return generate.main([path, "--prompt", "The", "--max-new-tokens", "2", "--seed", "0"])
    if command == "chat":
        return chat.main([path, "--prompt", "Hi", "--max-new-tokens", "2", "--seed", "0"])
    if command == "export":
        return export.main([path, "--format", "hf", "--output", str(tmp_path / "exported"), *(["--merge"] if adapter else [])])
    return train.main(["--init-from", path, "--data-files", str(corpus_jsonl), "--val-fraction", "0", "--dry-run-no-probe", "--device", "cpu"])


COMMANDS = ["evaluate", "generate", "chat", "export", "train --init-from"]


@pytest.mark.parametrize("command", COMMANDS)
def test_the_language_model_commands_take_the_same_folders(folders, tmp_path, corpus_jsonl, capsys, command):
    for name in LANGUAGE_MODEL_FOLDERS:
        status = run_command(command, folders[name], tmp_path / name, corpus_jsonl, adapter=name in ADAPTER_FOLDERS)
        assert status == 0, (name, capsys.readouterr().err)
        capsys.readouterr()
    for name in REFUSED_FOLDERS:
        status = run_command(command, folders[name], tmp_path / name, corpus_jsonl, adapter=False)
        error = capsys.readouterr().err
        assert status == 2 and error.startswith("error: ") and error.count("\n") == 1, (name, error)


def test_classify_takes_classifiers_only(folders, capsys):
    assert classify.main([str(folders["classifier"]), "--text", "a fine day"]) == 0
    assert "sentiment: " in capsys.readouterr().out
    for name in ["final_model", "lora", "hf", "peft", "peft_without_base", "random"]:
        assert classify.main([str(folders[name]), "--text", "a fine day"]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and ("not a classifier" in error or name in ("peft_without_base", "random")), (name, error)


def test_merge_lora_takes_an_adapter_old_new_or_peft_and_refuses_the_rest(folders, tmp_path, capsys):
    for name in ["old_lora", "peft"]:
        assert merge_lora.main([str(folders[name]), "--output", str(tmp_path / f"merged-{name}")]) == 0
        assert identify(tmp_path / f"merged-{name}").kind is FolderKind.LANGUAGE_MODEL
    for name in ["final_model", "peft_without_base", "classifier"]:
        assert merge_lora.main([str(folders[name]), "--output", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / name).exists()


def test_evaluate_scores_an_adapter_as_its_merged_model(folders, tmp_path, corpus_jsonl, capsys):
    """The defect this module fixed: `minigpt evaluate` could not load a LoRA adapter."""
    arguments = ["--data-files", str(corpus_jsonl), "--batch-size", "2", "--block-size", "16", "--max-batches", "2", "--json"]
    assert merge_lora.main([str(folders["lora"]), "--output", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert evaluate.main([str(folders["lora"]), *arguments]) == 0
    adapter_result = json.loads(capsys.readouterr().out)
    assert evaluate.main([str(tmp_path / "merged"), *arguments]) == 0
    assert json.loads(capsys.readouterr().out)["text"]["loss"] == pytest.approx(adapter_result["text"]["loss"], abs=1e-5)
